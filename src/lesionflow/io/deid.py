"""De-identification: DICOM PS3.15 Annex E Basic Application Level Confidentiality Profile.

Implemented: the Basic Profile (113100) with the Retain Longitudinal Temporal Information Modified Dates
Option (113107): every DA is shifted by one per-patient offset (DT: its date part), TM is kept.

Contract:

* Pure functions on pydicom Datasets; :func:`deidentify` modifies the dataset in place (file_meta too) and
  returns a :class:`DeidReport` that lists *which* tags changed and how, never an original value.
* Everything derived from an original value (pseudonym, date offset, UIDs, case id) is an HMAC-SHA256 keyed
  by :class:`DeidKey` ``secret``: deterministic and consistent across files, series and runs with the same
  secret, not reversible without it. Keep the secret out of the repository and the outputs.
* Apply it once, to original data: a second pass would shift dates and remap UIDs again.

Not handled (PHI can remain): text burned into the pixels (secondary captures, scanned documents, some
ultrasound/dose screens), identifying free text in attributes the profile keeps, and non-DICOM sidecars.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import json
from dataclasses import asdict, dataclass, field

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

PROFILE_NAME = "lesionflow PS3.15 basic profile"


def _words(text: str) -> list[str]:
    """Keywords from a whitespace-separated block (keeps the profile table compact and auditable)."""
    return text.split()


# --- PS3.15 Table E.1-1, "Basic Profile" column, for the attributes we handle explicitly -----------------
# Action codes: D = replace with a non-empty dummy; Z = replace with an empty (or dummy) value;
# X = remove; K = keep; U = replace UID with a consistent new UID. Where the table allows several
# ("X/Z", "X/Z/D"), we take the strictest that keeps the object valid (X for type 3, Z for type 2).
# Attributes applied at every nesting level (inside sequences too).
_Z = _words("""
    PatientName PatientID PatientBirthDate PatientSex ReferringPhysicianName AccessionNumber StudyID
    ContentCreatorName
""")  # Z: type 2 attributes; PatientName/PatientID at top level get the pseudonym (a Z dummy)
_D = _words("""
    PersonName VerifyingObserverName
""")  # D: type 1 inside SR; dummy "ANONYMIZED"
_X = _words("""
    IssuerOfPatientID PatientBirthTime OtherPatientIDs OtherPatientIDsSequence OtherPatientNames
    PatientBirthName PatientAge PatientSize PatientWeight PatientAddress PatientMotherBirthName MilitaryRank
    BranchOfService MedicalRecordLocator PatientTelephoneNumbers EthnicGroup Occupation
    AdditionalPatientHistory PatientComments PatientReligiousPreference ResponsiblePerson
    ResponsibleOrganization CountryOfResidence RegionOfResidence PatientInsurancePlanCodeSequence
    PatientPrimaryLanguageCodeSequence MedicalAlerts Allergies SmokingStatus PregnancyStatus
    LastMenstrualDate SpecialNeeds PatientState PatientTransportArrangements ReferencedPatientSequence
    PatientInstitutionResidence CurrentPatientLocation AdmissionID IssuerOfAdmissionID
    AdmittingDiagnosesDescription AdmittingDiagnosesCodeSequence VisitComments ServiceEpisodeID
    ServiceEpisodeDescription TimezoneOffsetFromUTC
    InstitutionName InstitutionAddress InstitutionCodeSequence InstitutionalDepartmentName
    ReferringPhysicianAddress ReferringPhysicianTelephoneNumbers ReferringPhysicianIdentificationSequence
    PhysiciansOfRecord PhysiciansOfRecordIdentificationSequence PerformingPhysicianName
    PerformingPhysicianIdentificationSequence NameOfPhysiciansReadingStudy
    PhysiciansReadingStudyIdentificationSequence OperatorsName OperatorIdentificationSequence
    RequestingPhysician RequestingService ScheduledPerformingPhysicianName VerifyingOrganization
    StationName DeviceSerialNumber PerformedStationName PerformedStationAETitle PerformedLocation
    ScheduledStationName ScheduledStationAETitle ScheduledStudyLocation ScheduledStudyLocationAETitle
    StudyDescription SeriesDescription ImageComments RequestedProcedureDescription RequestedProcedureID
    ProtocolName PerformedProcedureStepDescription PerformedProcedureStepID
    ScheduledProcedureStepDescription ScheduledProcedureStepID StudyComments ReasonForStudy
    ReasonForTheRequestedProcedure RequestedProcedureComments ImagingServiceRequestComments
    PlacerOrderNumberImagingServiceRequest FillerOrderNumberImagingServiceRequest RequestAttributesSequence
    ReferencedStudySequence ReferencedPerformedProcedureStepSequence AcquisitionComments
    DerivationDescription FrameComments TextValue IconImageSequence
    OriginalAttributesSequence ModifiedAttributesSequence DigitalSignaturesSequence MACParametersSequence
    EncryptedAttributesSequence
""")  # X: remove (type 3, or identifying free text / old values that cannot be cleaned)
# U: every other UI value is remapped (see _KEEP_UIDS). K: everything not listed is kept, except that any
# PN is emptied (Z), DA/DT are shifted (113107) and private tags, curves (50xx) and overlays (60xx) are X.
_PROFILE: dict[str, str] = {kw: "Z" for kw in _Z} | {kw: "D" for kw in _D} | {kw: "X" for kw in _X}

# UIDs that name DICOM-defined things (classes, syntaxes, coding schemes), not this patient's instances: K.
_KEEP_UIDS = frozenset(
    _words("""
    SOPClassUID MediaStorageSOPClassUID ReferencedSOPClassUID ReferencedSOPClassUIDInFile TransferSyntaxUID
    ReferencedTransferSyntaxUIDInFile ImplementationClassUID RelatedGeneralSOPClassUID
    OriginalSpecializedSOPClassUID CodingSchemeUID MappingResourceUID ContextUID
    """)
)
_DICOM_UID_ROOT = "1.2.840.10008."
# File meta elements that can name the sending site or carry private data: X.
_FILE_META_X = (
    "SourceApplicationEntityTitle",
    "SendingApplicationEntityTitle",
    "ReceivingApplicationEntityTitle",
    "PrivateInformationCreatorUID",
    "PrivateInformation",
)
_PIXEL_TAGS = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})


@dataclass(frozen=True)
class DeidKey:
    """The secret behind every pseudonym, date offset and UID. ``repr`` never shows it."""

    secret: str = field(repr=False)
    max_date_shift_days: int = 365

    def __post_init__(self) -> None:
        # An empty (public) key would make pseudonyms reversible by hashing candidate patient IDs.
        if not self.secret:
            raise ValueError("DeidKey.secret must be a non-empty secret string; set LESIONFLOW_DEID_SECRET")
        if self.max_date_shift_days < 1:
            raise ValueError(f"max_date_shift_days must be >= 1, got {self.max_date_shift_days}")


@dataclass(frozen=True)
class TagChange:
    """One attribute changed by :func:`deidentify` (tag like ``(0010,0010)``; no value)."""

    tag: str
    keyword: str
    action: str  # removed | replaced | emptied | date_shifted | uid_remapped | private_removed


@dataclass(frozen=True)
class DeidReport:
    """What :func:`deidentify` did. Holds no original value."""

    pseudonym: str
    date_shift_days: int
    changes: tuple[TagChange, ...]

    def to_json(self, *, include_date_shift: bool = False) -> str:
        """Deterministic JSON (sorted). The date offset is left out unless asked for: stored next to the
        shifted dates it would give the real dates back."""
        data: dict[str, object] = {
            "pseudonym": self.pseudonym,
            "changes": [asdict(c) for c in sorted(self.changes, key=lambda c: (c.tag, c.keyword, c.action))],
        }
        if include_date_shift:
            data["date_shift_days"] = self.date_shift_days
        return json.dumps(data, sort_keys=True, indent=1)


def _hmac(key: DeidKey, message: str) -> bytes:
    return hmac.new(key.secret.encode("utf-8"), message.encode("utf-8"), hashlib.sha256).digest()


def patient_pseudonym(patient_id: str, key: DeidKey) -> str:
    """``anon-`` + 12 hex of HMAC-SHA256(secret, "patient:" + id): one stable pseudonym per patient ID."""
    return "anon-" + _hmac(key, "patient:" + patient_id.strip()).hex()[:12]


def date_shift_days(patient_id: str, key: DeidKey) -> int:
    """The patient's date offset in [-max, max] without 0, from HMAC(secret, "dateshift:" + id)."""
    span = key.max_date_shift_days
    n = int.from_bytes(_hmac(key, "dateshift:" + patient_id.strip())[:8], "big") % (2 * span)
    return n - span if n < span else n - span + 1  # 0..span-1 -> -span..-1, span..2span-1 -> 1..span


def remap_uid(uid: str, key: DeidKey) -> str:
    """``2.25.`` + decimal of the first 16 bytes of HMAC(secret, uid): a valid UID of <= 44 characters."""
    return "2.25." + str(int.from_bytes(_hmac(key, uid.strip("\x00 "))[:16], "big"))


def pseudonymous_case_id(series_uid: str, key: DeidKey) -> str:
    """``dcm_`` + 10 hex of HMAC(secret, "series:" + uid): a folder-safe case id for one series."""
    return "dcm_" + _hmac(key, "series:" + series_uid.strip("\x00 ")).hex()[:10]


def _tag_str(elem: DataElement) -> str:
    return f"({elem.tag.group:04X},{elem.tag.element:04X})"


def _shift_date(text: str, days: int) -> str | None:
    """YYYYMMDD shifted by ``days``, or None when ``text`` is not a full valid date."""
    text = text.strip()
    if len(text) == 10 and text[4] == "." and text[7] == ".":  # ACR-NEMA style YYYY.MM.DD
        text = text.replace(".", "")
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        day = dt.date(int(text[0:4]), int(text[4:6]), int(text[6:8])) + dt.timedelta(days=days)
    except (ValueError, OverflowError):
        return None
    return f"{day.year:04d}{day.month:02d}{day.day:02d}"


def _shift_datetime(text: str, days: int) -> str | None:
    """DT with its date part shifted; the time and UTC offset suffix are kept. None if no full date."""
    text = text.strip()
    date = _shift_date(text[:8], days) if len(text) >= 8 else None
    return None if date is None else date + text[8:]


class _Cleaner:
    """One pass over a dataset; collects the TagChanges."""

    def __init__(self, key: DeidKey, shift: int) -> None:
        self.key, self.shift = key, shift
        self.changes: set[TagChange] = set()

    def note(self, elem: DataElement, action: str) -> None:
        self.changes.add(TagChange(_tag_str(elem), elem.keyword or "", action))

    def dataset(self, ds: Dataset, depth: int) -> None:
        for elem in list(ds):
            tag, keyword = elem.tag, elem.keyword
            if tag.is_private:
                del ds[tag]
                self.note(elem, "private_removed")
                continue
            if tag.group & 0xFF00 in (0x5000, 0x6000):  # curves and overlays (may hold annotations): X
                del ds[tag]
                self.note(elem, "removed")
                continue
            if depth == 0 and keyword in ("PatientName", "PatientID"):
                continue  # replaced by the pseudonym after the walk
            action = _PROFILE.get(keyword)
            if action == "X":
                del ds[tag]
                self.note(elem, "removed")
            elif action == "Z" or (action is None and elem.VR == "PN"):
                if not elem.is_empty:
                    elem.value = Sequence() if elem.VR == "SQ" else ""
                    self.note(elem, "emptied")
            elif action == "D":
                elem.value = "ANONYMIZED"
                self.note(elem, "replaced")
            elif elem.VR == "SQ":
                for item in elem.value:
                    self.dataset(item, depth + 1)
            elif elem.VR in ("DA", "DT") and not elem.is_empty:
                self.dates(elem)
            elif elem.VR == "UI" and not elem.is_empty:
                self.uids(elem)

    def dates(self, elem: DataElement) -> None:
        shift = _shift_date if elem.VR == "DA" else _shift_datetime
        values = [str(v) for v in (elem.value if elem.VM > 1 else [elem.value])]
        shifted = [shift(v, self.shift) if v.strip() else "" for v in values]
        if any(s is None for s in shifted):  # not a date we can shift: drop its value instead (Z)
            elem.value = ""
            self.note(elem, "emptied")
            return
        elem.value = shifted if len(shifted) > 1 else shifted[0]
        self.note(elem, "date_shifted")

    def uids(self, elem: DataElement) -> None:
        if elem.keyword in _KEEP_UIDS:
            return
        values = [str(v).strip("\x00 ") for v in (elem.value if elem.VM > 1 else [elem.value])]
        mapped = [v if not v or v.startswith(_DICOM_UID_ROOT) else remap_uid(v, self.key) for v in values]
        if mapped != values:
            elem.value = mapped if len(mapped) > 1 else mapped[0]
            self.note(elem, "uid_remapped")


def deidentify(ds: Dataset, key: DeidKey) -> DeidReport:
    """Apply the basic profile (+ modified dates option) to ``ds`` in place; return what was changed.

    PatientName and PatientID become the patient's pseudonym; dates move by the patient's offset; instance
    UIDs are remapped (same original UID -> same new UID everywhere, file_meta included).
    """
    patient_id = str(ds.get("PatientID", "") or "")
    pseudonym = patient_pseudonym(patient_id, key)
    shift = date_shift_days(patient_id, key)
    cleaner = _Cleaner(key, shift)
    cleaner.dataset(ds, depth=0)

    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        for keyword in _FILE_META_X:
            if keyword in meta:
                cleaner.note(meta[keyword], "removed")
                del meta[keyword]
        if meta.get("MediaStorageSOPInstanceUID"):
            cleaner.uids(meta["MediaStorageSOPInstanceUID"])

    for keyword in ("PatientName", "PatientID"):
        setattr(ds, keyword, pseudonym)
        cleaner.note(ds[keyword], "replaced")
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = PROFILE_NAME
    ds.LongitudinalTemporalInformationModified = "MODIFIED"
    codes = []
    for value, meaning in (
        ("113100", "Basic Application Confidentiality Profile"),
        ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    ):
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
        codes.append(item)
    ds.DeidentificationMethodCodeSequence = codes
    return DeidReport(pseudonym, shift, tuple(sorted(cleaner.changes, key=lambda c: (c.tag, c.keyword, c.action))))


def deidentified_header_json(ds: Dataset) -> str:
    """The header of a de-identified dataset without pixel data, as DICOM JSON (PS3.18 F) with sorted keys.

    Refuses a dataset that :func:`deidentify` has not processed, so PHI cannot be stored by mistake.
    File meta is not included (it only holds the remapped SOP Instance UID and the transfer syntax).
    """
    if str(ds.get("PatientIdentityRemoved", "")).upper() != "YES":
        raise ValueError("dataset is not de-identified (PatientIdentityRemoved != YES); call deidentify first")
    header = Dataset()
    for elem in ds:
        if elem.tag not in _PIXEL_TAGS:
            header.add(elem)
    return json.dumps(header.to_json_dict(), sort_keys=True, indent=1)
