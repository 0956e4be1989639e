"""Request and response bodies of the HTTP service, with their bounds (part of the published OpenAPI schema).

Request bodies are parsed and validated in one pass from the raw bytes (``parse_body``): a body that is not JSON is
told apart from JSON that does not match the schema (400 vs 422, see ``genrec.serve.app``), and every mismatch is
reported with the path of the offending field (``history[3]``, ``k``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar, Union

from pydantic import BaseModel, ConfigDict, Field, GetPydanticSchema, StrictBool, StringConstraints, ValidationError
from typing_extensions import NotRequired, TypedDict  # pydantic's own dependency; typing's TypedDict before 3.12

from genrec.api import MAX_ABS_TIMESTAMP, Events

MAX_K = 1000
MAX_HISTORY = 10_000
MAX_CANDIDATES = 10_000
MAX_ID_CHARS = 256
MAX_REPORTED_ERRORS = 20  # a 10,000-event history of bad events gets the first 20 reasons, not 10,000
MAX_RETRIEVE_K = 1000  # candidates the two-stage service re-ranks per request
MAX_NAMES = 64  # actions per event, task weights and user features per request
MAX_NAME_CHARS = 64  # task, action and user feature names
MAX_ABS_WEIGHT = 1e6  # task weights: |w| <= this keeps every combined score finite


def _one_error(kind: str, message: str) -> GetPydanticSchema:
    """A union that fails with one error saying what is allowed (``kind``, ``message``), instead of one error per
    alternative at paths tagged with the alternatives' internal names. Validation stays in pydantic-core."""

    def schema(source: Any, handler: Any) -> Any:
        core = handler(source)
        core["custom_error_type"], core["custom_error_message"] = kind, message
        return core

    return GetPydanticSchema(schema)


_StrId = Annotated[str, StringConstraints(strict=True, max_length=MAX_ID_CHARS)]
_IntId = Annotated[int, Field(strict=True, ge=-(2**63), le=2**63 - 1)]
ItemIdIn = Annotated[
    Union[_StrId, _IntId],
    _one_error("item_id", f"an item id is a string of at most {MAX_ID_CHARS} characters or a 64-bit integer"),
]
Timestamp = Union[Annotated[int, Field(strict=True, ge=-MAX_ABS_TIMESTAMP, le=MAX_ABS_TIMESTAMP)], None]


# A TypedDict rather than a model: pydantic validates a 200-event history into plain dicts in less than half the time
# it takes to build 200 model instances (0.18 vs 0.39 ms per request, measured), a tenth of the server's CPU per
# request under load. (The docstring is the public schema's description.)
class Event(TypedDict):
    """One interaction: the raw item id and, optionally, its timestamp (the training data's unit)."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    item: Union[_StrId, _IntId]
    ts: NotRequired[Timestamp]


HistoryEvent = Annotated[
    Union[Event, _StrId, _IntId],
    _one_error(
        "history_event",
        f'a history event is an item id (a string of at most {MAX_ID_CHARS} characters or a 64-bit integer) or '
        f'{{"item": id, "ts": integer or null}} with |ts| <= 2**53 and no other key',
    ),
]
HistoryIn = Annotated[list[HistoryEvent], Field(max_length=MAX_HISTORY)]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"history": [{"item": "1193", "ts": 978300760}, "661", "914"], "k": 10}]},
    )
    history: HistoryIn = Field(default_factory=list, description="oldest first; [] for a new user")
    k: Annotated[int, Field(strict=True, ge=1, le=MAX_K)] = 10
    exclude_seen: StrictBool = True
    exclude: Annotated[list[ItemIdIn], Field(max_length=MAX_CANDIDATES)] = Field(default_factory=list)
    query_ts: Timestamp = Field(None, description="request time for the time term; default: the last event's ts")


class RankRequest(BaseModel):
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"history": ["1193", "661"], "candidates": ["914", "3408", "2355"]}]},
    )
    history: HistoryIn = Field(default_factory=list)
    candidates: Annotated[list[ItemIdIn], Field(max_length=MAX_CANDIDATES)]
    query_ts: Timestamp = None


# Two-stage service (``genrec serve --ranker DIR``): history events may carry their actions for the ranker.

_Name = Annotated[str, StringConstraints(strict=True, min_length=1, max_length=MAX_NAME_CHARS)]
_Weight = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=-MAX_ABS_WEIGHT, le=MAX_ABS_WEIGHT)]
_FeatureValue = Union[_StrId, _IntId]


class RankerEvent(TypedDict):
    """One interaction: the raw item id, optionally its timestamp, and optionally its actions (the ranker's action
    names that happened, e.g. ``["like"]``; absent = none). The retrieval model reads only item and ts."""

    __pydantic_config__ = ConfigDict(extra="forbid")  # type: ignore[misc]
    item: _StrId | _IntId
    ts: NotRequired[Timestamp]
    actions: NotRequired[Annotated[list[_Name], Field(max_length=MAX_NAMES)]]


RankerHistoryEvent = Annotated[
    RankerEvent | _StrId | _IntId,
    _one_error(
        "history_event",
        f'a history event is an item id (a string of at most {MAX_ID_CHARS} characters or a 64-bit integer) or '
        f'{{"item": id, "ts": integer or null, "actions": [action names]}} with |ts| <= 2**53, at most {MAX_NAMES} '
        "actions and no other key",
    ),
]
RankerHistoryIn = Annotated[list[RankerHistoryEvent], Field(max_length=MAX_HISTORY)]
TaskWeightsIn = Annotated[
    dict[_Name, _Weight],
    Field(max_length=MAX_NAMES, description="task -> weight of its probability in the combined score (|w| <= 1e6); "
                                             "tasks not named keep the server's weight"),
]  # fmt: skip
UserFeaturesIn = Annotated[
    dict[_Name, _FeatureValue],
    Field(max_length=MAX_NAMES, description="user feature -> raw value, for a ranker trained with user features"),
]


class TwoStageRecommendRequest(BaseModel):
    """``POST /v1/recommend`` of the two-stage service: retrieve ``retrieve_k`` items, re-rank them, return k."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{
            "history": [{"item": "1193", "ts": 978300760, "actions": ["r5"]}, {"item": "661", "ts": 978302109}],
            "k": 10, "retrieve_k": 200, "task_weights": {"like": 1.0, "love": 0.5},
        }]},
    )  # fmt: skip
    history: RankerHistoryIn = Field(default_factory=list, description="oldest first; [] for a new user")
    k: Annotated[int, Field(strict=True, ge=1, le=MAX_K)] = 10
    retrieve_k: Annotated[int, Field(strict=True, ge=1, le=MAX_RETRIEVE_K)] | None = Field(
        None, description="items the retrieval model hands to the ranker (>= k); default: the server's --retrieve-k"
    )
    exclude_seen: StrictBool = True
    exclude: Annotated[list[ItemIdIn], Field(max_length=MAX_CANDIDATES)] = Field(default_factory=list)
    query_ts: Timestamp = Field(None, description="request time for the time terms; default: the last event's ts")
    task_weights: TaskWeightsIn | None = None
    user_features: UserFeaturesIn | None = None


class TwoStageRankRequest(BaseModel):
    """``POST /v1/rank`` of the two-stage service: the ranker's per-task probabilities for the given candidates."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"history": [{"item": "1193", "actions": ["r5"]}, "661"],
                                         "candidates": ["914", "3408", "2355"]}]},
    )  # fmt: skip
    history: RankerHistoryIn = Field(default_factory=list)
    candidates: Annotated[list[ItemIdIn], Field(max_length=MAX_CANDIDATES)]
    query_ts: Timestamp = None
    task_weights: TaskWeightsIn | None = None
    user_features: UserFeaturesIn | None = None


class ScoredItem(BaseModel):
    item: str
    score: float | None = Field(description="null for an unknown candidate")
    title: str | None = None


class RecommendResponse(BaseModel):
    items: list[ScoredItem]
    fallback: str | None = Field(description='"popularity" when the history had no known item')
    unknown_items: list[str]
    warnings: list[str]
    model_id: str


class RankResponse(BaseModel):
    scores: list[ScoredItem] = Field(description="one per candidate, in the request's order")
    task: str = Field("next_item", description="the retrieval model's only task; rankers add per-task scores")
    fallback: str | None
    unknown_items: list[str]
    unknown_candidates: list[str]
    warnings: list[str]
    model_id: str


class HealthResponse(BaseModel):
    status: str
    model_id: str
    model: str
    num_items: int
    max_len: int
    popularity_fallback: bool
    version: str


class TwoStageItem(BaseModel):
    item: str
    score: float | None = Field(description="the combined score Σ_t w_t·p_t the items are sorted by; null when the "
                                            "ranker does not know the item")  # fmt: skip
    retrieval_score: float = Field(description="the retrieval model's score (a popularity share for the fallback)")
    probs: dict[str, float | None] = Field(description="task -> the ranker's probability (null: item unknown to it)")
    title: str | None = None


class TwoStageRecommendResponse(BaseModel):
    items: list[TwoStageItem] = Field(description="the top k of the re-ranked candidates, best first")
    stage: Literal["two-stage"] = "two-stage"
    tasks: list[str]
    task_weights: dict[str, float] = Field(description="the weights the combined score used")
    retrieve_k: int = Field(description="candidates asked of the retrieval model")
    retrieved: int = Field(description="candidates it returned and the ranker scored")
    fallback: str | None = Field(description='"popularity" when the history had no item known to the retriever')
    unknown_items: list[str] = Field(description="history items unknown to the retrieval model")
    ranker_unknown_items: list[str] = Field(description="history items unknown to the ranker")
    warnings: list[str]
    model_id: str
    ranker_model_id: str


class TaskScoredItem(BaseModel):
    item: str
    probs: dict[str, float | None] = Field(description="task -> probability; null for an unknown candidate")
    score: float | None = Field(description="the combined score Σ_t w_t·p_t; null for an unknown candidate")
    title: str | None = None


class TwoStageRankResponse(BaseModel):
    items: list[TaskScoredItem] = Field(description="one per candidate, in the request's order")
    tasks: list[str]
    task_weights: dict[str, float]
    unknown_items: list[str] = Field(description="history items unknown to the ranker")
    unknown_candidates: list[str]
    warnings: list[str]
    model_id: str = Field(description="the ranker's model id")


class RankerHealth(BaseModel):
    model_id: str
    tasks: list[str]
    actions: list[str] = Field(description="the action names history events may carry")
    task_weights: dict[str, float]
    retrieve_k: int
    max_retrieve_k: int


class TwoStageHealthResponse(HealthResponse):
    stage: Literal["two-stage"] = "two-stage"
    ranker: RankerHealth


class FieldError(BaseModel):
    loc: list[Union[str, int]] = Field(description='where: ["body", field, index, ...]')
    msg: str
    type: str


class ErrorResponse(BaseModel):
    """The body of every 4xx and 5xx answer."""

    detail: str = Field(description="what was wrong, for a person")


class ValidationErrorResponse(ErrorResponse):
    """422: the body is JSON, but not what the endpoint takes."""

    errors: list[FieldError] = Field(description=f"each mismatch (the first {MAX_REPORTED_ERRORS})")


# ----------------------------------------------------------------------------------------------------------------
# Parsing
# ----------------------------------------------------------------------------------------------------------------


class BodyError(Exception):
    """A request body the service cannot take: ``status`` (400, 415 or 422) and a ``detail`` for the client, plus
    the field errors of a 422."""

    def __init__(self, status: int, detail: str, errors: list[dict[str, Any]] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.errors = status, detail, errors


def field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    """``("history", 3, "ts")`` -> ``history[3].ts``; the empty path is the body itself."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "request body"


def describe_errors(errors: list[dict[str, Any]], where: tuple[str, ...] = ("body",)) -> tuple[str, list[dict]]:
    """pydantic's errors about the part ``where`` of a request -> (one line for a person, the structured list with
    ``where`` in front of each path), without echoing the input back."""
    shown = [{"loc": [*where, *e.get("loc", ())], "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
             for e in errors[:MAX_REPORTED_ERRORS]]  # fmt: skip
    line = "; ".join(f"{field_path(e['loc'][len(where):])}: {e['msg']}" for e in shown)
    if len(errors) > len(shown):
        line += f"; and {len(errors) - len(shown)} more"
    return line, shown


M = TypeVar("M", bound=BaseModel)


def check_content_type(value: str | None) -> None:
    """Request bodies are JSON: ``Content-Type: application/json`` (a ``charset`` parameter, if any, is utf-8)."""
    expected = "expected Content-Type: application/json"
    if not value:
        raise BodyError(415, f"the request has no Content-Type; {expected}")
    media, *params = [p.strip() for p in value.split(";")]
    if media.lower() != "application/json":
        raise BodyError(415, f"unsupported Content-Type {value[:100]!r}; {expected}")
    for param in params:
        name, _, charset = param.partition("=")
        if name.strip().lower() == "charset" and charset.strip().strip('"').lower() not in ("utf-8", "utf8"):
            raise BodyError(415, f"unsupported charset in Content-Type {value[:100]!r}; JSON bodies are UTF-8")


def parse_body(model: type[M], content_type: str | None, body: bytes) -> M:
    """The validated request ``model`` from a raw body, or ``BodyError``: 415 for a body that is not declared as
    JSON, 400 for one that is not JSON (empty, not UTF-8, a syntax error, nested too deeply), 422 for JSON that
    does not match the schema (with the field paths)."""
    check_content_type(content_type)
    if not body.strip():
        raise BodyError(400, "the request body is empty; expected a JSON object")
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BodyError(400, f"the request body is not valid UTF-8 (byte {exc.start}: {exc.reason})") from None
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        syntax = [e for e in errors if e.get("type") == "json_invalid"]
        if syntax:
            reason = str(syntax[0].get("msg", "")).removeprefix("Invalid JSON: ")
            if "recursion limit" in reason:
                reason = f"nested too deeply ({reason})"
            raise BodyError(400, f"the request body is not valid JSON: {reason}") from None
        detail, shown = describe_errors(errors)
        raise BodyError(422, detail, shown) from None


def to_events(events: list) -> Events:
    """Validated request events -> ``genrec.api.Events`` (the model's types are checked by pydantic already)."""
    return Events(
        [str(e["item"]) if isinstance(e, dict) else str(e) for e in events],
        [e.get("ts") if isinstance(e, dict) else None for e in events],
    )

