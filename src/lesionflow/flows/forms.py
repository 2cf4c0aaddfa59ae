"""The flows' section parameters as partial models: the Prefect "Custom run" form replaces only the keys filled in.

``Overrides[QualityParams]`` is the ``quality`` section with every key optional (None = not given) and without a
default in the flow's parameter schema, built from the section model (recursively for nested sections, such as
``quality.raw``). Prefect's form pre-fills, and then submits, every key whose schema has a default; a section
model with its code defaults would therefore replace every key of params.yaml (issue 19, item 1). Here an opened
section shows empty inputs with each key's type, bounds and description, and submits only what was typed.

A partial model checks types and bounds (the form shows them before submitting) and takes ints, floats and bools
only as they are, like params.yaml; the rules between keys (``min < max`` and the like) are the params models' own,
checked once on the merged params (``lesionflow.flows.common.resolve_params``). A key cannot be set to null from
here (None means "not given"): ``overrides`` (``train.patch_size=null``) can.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Generic, TypeVar, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, create_model, field_validator, model_validator
from pydantic.fields import FieldInfo
from pydantic.json_schema import SkipJsonSchema

# the one strictness rule of params (lesionflow.params_synth.StrictSection); reused, not restated
from lesionflow.params_synth import StrictSection, _scalar_mismatch

Section = TypeVar("Section", bound=StrictSection)
# None is "not given", not a value the form offers: a null option in the schema would be pre-selected and submitted
_NOT_GIVEN: Any = Annotated[None, SkipJsonSchema()]  # what SkipJsonSchema[None] means


class _PartialSection(BaseModel):
    """Base of every generated partial model; ``source`` is the section model it mirrors."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    source: ClassVar[type[StrictSection]]

    @model_validator(mode="before")
    @classmethod
    def _from_section_model(cls, value: Any) -> Any:
        # a Python caller may pass the section model itself (TrainParams(steps=5)): only the keys it set count
        return value.model_dump(exclude_unset=True) if isinstance(value, StrictSection) else value

    @field_validator("*", mode="before")
    @classmethod
    def _strict_scalars(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.source.model_fields.get(info.field_name or "")
        reason = None if field is None or value is None else _scalar_mismatch(field.annotation, value)
        if reason is not None:
            raise ValueError(reason)
        return value


def _without_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)  # a default is what the form pre-fills and submits


def _nested_section(annotation: Any) -> type[StrictSection] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, StrictSection) else None


def _partial_field(info: FieldInfo) -> tuple[Any, Any]:
    """The field's type (constraints kept) or None, defaulting to None, with no default in the JSON schema."""
    nested = _nested_section(info.annotation)
    value_type: Any = partial_model(nested) if nested is not None else info.annotation
    if info.metadata:  # ge, le, min_length...: the form shows and checks them
        value_type = Annotated[value_type, *info.metadata]
    field = Field(None, title=info.title, description=info.description, json_schema_extra=_without_default)
    return value_type | _NOT_GIVEN, field


_MODELS: dict[type[StrictSection], type[_PartialSection]] = {}


def partial_model(section: type[StrictSection]) -> type[_PartialSection]:
    """The partial model of ``section`` (one per section: the flows and the form share it)."""
    if section in _MODELS:
        return _MODELS[section]
    name = section.__name__.removesuffix("Params") + "Overrides"
    fields = {key: _partial_field(info) for key, info in section.model_fields.items()}
    doc = f"{(section.__doc__ or section.__name__).strip()} Empty keys keep params.yaml's values."
    model = create_model(name, __base__=_PartialSection, __doc__=doc, __module__=__name__, **fields)  # type: ignore[call-overload]
    model.source = section
    _MODELS[section] = model
    return model


class Overrides(BaseModel, Generic[Section]):
    """``Overrides[TrainParams]``: the partial model of a section, as a flow parameter's type.

    Only a name for :func:`partial_model` that type checkers read as a model; it is never instantiated itself.
    """

    def __class_getitem__(cls, section: Any) -> Any:
        if isinstance(section, TypeVar) or get_origin(section) is not None or get_args(section):
            return super().__class_getitem__(section)  # typing's own use (Overrides[Section])
        return partial_model(section)
