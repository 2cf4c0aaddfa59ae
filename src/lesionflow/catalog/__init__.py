"""The artifact catalog: every workspace artifact declared once (``artifacts``), how the cache measures it
(``digests``) and how stages read what another stage wrote (``readers``)."""
