"""The seed's metrics endpoint on FastAPI, async over `AsyncMetricsStore` (the `server` extra).

`GET /v1/town/{town_id}/metrics?action_type=&since_hours=` answers with the seed's JSON (or over
`since=&until=`, ISO 8601 moments, instead of the last `since_hours`); it needs
`Authorization: Bearer <token>`. A token may read every town or a listed few (`ApiTokens`).
`GET /healthz` needs no token. Bad parameters get 422, a database that cannot answer 503, never a 500.
`POST /v1/actions` (writers, see `wire`) and the tokens' scopes (see `access`) are included here.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import logging
import os
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from types import GenericAlias
from typing import Annotated, Any, Final, Literal, get_args, get_origin, get_type_hints
from urllib.parse import parse_qsl, quote, urlencode

from fastapi import Depends, FastAPI, HTTPException, Path, Query, Request, status
from fastapi.exceptions import RequestValidationError
from pydantic import AwareDatetime, BaseModel, ConfigDict, create_model
from sqlalchemy import URL
from starlette import types as asgi
from starlette.convertors import Convertor, register_url_convertor

from action_metrics import wire
from action_metrics.access import (
    TOKEN_VARIABLE,
    TOKENS_VARIABLE,
    Access,
    ApiTokens,
    Credentials,
    Scope,
    TokenGrant,
)
from action_metrics.aggregate import Aggregate
from action_metrics.breakdown import BUCKETS, DIMENSIONS, SORT_KEYS
from action_metrics.errors import DatabaseError, DatabaseUnavailable, InvalidFilter, TokenConfigError
from action_metrics.intake import Intake, IntakeLimits
from action_metrics.intake import unavailable as _unavailable
from action_metrics.page import add_page
from action_metrics.report import DEFAULT_LOD3_P95_BUDGET_MS, any_failed, run_checks
from action_metrics.store import AsyncMetricsStore
from action_metrics.validation import ACTION_TYPE_PATTERN, MAX_ID_LENGTH
from action_metrics.window import MAX_HOURS, TimeWindow

logger = logging.getLogger(__name__)

MAX_SINCE_HOURS: Final = MAX_HOURS

# --- response shapes ------------------------------------------------------------------------


def response_model(shape: type[Any]) -> type[BaseModel]:
    """The pydantic model of a frozen dataclass's `to_dict()`: its fields, then its public properties.

    Derived rather than written out, so that a figure added to `Aggregate` (or `ModelAggregate`)
    appears in the OpenAPI schema, and is validated in every answer, without a change here.
    """
    hints = get_type_hints(shape)
    figures: dict[str, Any] = {field.name: hints[field.name] for field in dataclasses.fields(shape)}
    for name, member in vars(shape).items():
        if isinstance(member, property) and not name.startswith("_"):
            figures[name] = get_type_hints(member.fget)["return"]
    fields: dict[str, Any] = {name: (_schema_type(annotation), ...) for name, annotation in figures.items()}
    model: type[BaseModel] = create_model(
        shape.__name__, __config__=ConfigDict(extra="forbid"), __doc__=shape.__doc__, **fields
    )
    return model


def _schema_type(annotation: Any) -> Any:
    """`annotation` with every dataclass in it (`Mapping[str, ModelAggregate]`) replaced by its model."""
    if dataclasses.is_dataclass(annotation):
        return response_model(annotation)  # type: ignore[arg-type]
    origin, arguments = get_origin(annotation), get_args(annotation)
    if origin is None or not arguments:
        return annotation
    if origin is Mapping or origin is dict:
        key, value = arguments
        return GenericAlias(dict, (key, _schema_type(value)))
    return annotation


Metrics = response_model(Aggregate)


class TownMetrics(BaseModel):
    """The seed's answer: which town, which action, which window, and its numbers."""

    town_id: str
    action_type: str | None
    time_window_hours: int | float
    metrics: Metrics  # type: ignore[valid-type]


class Towns(BaseModel):
    """The towns a token may read, sorted."""

    towns: list[str]


class Check(BaseModel):
    """One SLO or ethics check: `pass`, `fail` or `no data`, and the figures behind the verdict."""

    name: str
    kind: str
    status: Literal["pass", "fail", "no data"]
    detail: str


class TownChecks(BaseModel):
    """`report --check` over one town: each check, and whether none failed."""

    town_id: str
    checks: list[Check]
    passed: bool


class Health(BaseModel):
    status: str


class Problem(BaseModel):
    detail: str


# --- the app ----------------------------------------------------------------------------------


def _store(request: Request) -> AsyncMetricsStore:
    store: AsyncMetricsStore = request.app.state.store
    return store


READ_ANSWERS: Final[dict[int | str, dict[str, Any]]] = {
    401: {"model": Problem, "description": "Missing or unknown bearer token"},
    403: {"model": Problem, "description": "The token may not read"},
    503: {
        "model": Problem,
        "description": "The database is unreachable (retry after `Retry-After` seconds) or its schema "
        "is behind",
    },
}
"""The errors every read that asks the database may answer with."""

TOWN_READ_ANSWERS: Final[dict[int | str, dict[str, Any]]] = {
    **READ_ANSWERS,
    403: {"model": Problem, "description": "The token may not read, or not this town"},
}
"""The errors every read of one town may answer with."""

TownId = Annotated[
    str,
    Path(
        min_length=1,
        max_length=MAX_ID_LENGTH,
        description="The town's id, percent-encoded: it may hold `/` (%2F), spaces, `%`, `?`, `#`. "
        "The ids `.` and `..` cannot be a URL's path segment: send them as `?town_id=` instead "
        "(`/v1/town/metrics?town_id=..`).",
    ),
]
"""Routed as `{town_id:town}`: a town id may hold a `/`, which arrives decoded. Each route ends in its
own fixed segment (`/metrics`, `/breakdown`, `/checks`), so `/v1/town/a/b/metrics` is town `a/b`'s
metrics and nothing else."""


class TownIdConvertor(Convertor[str]):
    """Any characters, `/` and line breaks included: Starlette's `path` stops at a line break, and a
    town id may hold one."""

    regex = "(?s:.*)"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("town", TownIdConvertor())

TOWN_READS: Final = ("metrics", "breakdown", "checks")
"""The reads of one town, each `/v1/town/{town_id}/<read>`."""
_TOWN_IN_QUERY: Final = {f"/v1/town/{read}": read for read in TOWN_READS}
_NO_TOWN_SEGMENT: Final = (
    "no town id in the path: URLs resolve a path segment `.` or `..` (percent-encoded or not, in "
    "browsers) as 'here' and 'up', so a town with such an id is read as /v1/town/{read}?town_id=.."
)


class TownIdInQuery:
    """Routes `/v1/town/metrics?town_id=..` as `/v1/town/../metrics` (and so for each of
    `TOWN_READS`): the towns `.` and `..` have no URL path of their own, since clients resolve
    such a segment, browsers even as `%2E`, as "here" or "up". The rewrite happens before routing,
    so the read, its checks and its token's towns are those of the path form."""

    def __init__(self, app: asgi.ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        read = _TOWN_IN_QUERY.get(scope["path"]) if scope["type"] == "http" else None
        if read is not None:
            parameters = parse_qsl(scope["query_string"].decode("latin-1"), keep_blank_values=True)
            towns = [value for name, value in parameters if name == "town_id"]
            if len(towns) == 1:  # else not rewritten: `no_town_segment` answers
                rest = urlencode([(name, value) for name, value in parameters if name != "town_id"])
                scope = {
                    **scope,
                    "path": f"/v1/town/{towns[0]}/{read}",
                    "raw_path": f"/v1/town/{quote(towns[0], safe='')}/{read}".encode(),
                    "query_string": rest.encode(),
                }
        await self.app(scope, receive, send)


def _invalid_query(error: InvalidFilter) -> RequestValidationError:
    """422 naming the query parameter at fault, as FastAPI's own validation answers."""
    return RequestValidationError(
        [{"type": "value_error", "loc": ("query", error.field), "msg": str(error), "input": None}]
    )


async def time_window(
    since_hours: Annotated[
        float | None,
        Query(
            gt=0,
            le=MAX_SINCE_HOURS,
            description="The window: the N hours before `until` (default now); 24 without `since`.",
        ),
    ] = None,
    since: Annotated[
        AwareDatetime | None,
        Query(
            description="The window's start (inclusive), ISO 8601 with an offset, e.g. "
            "2025-06-01T00:00:00+02:00; instead of `since_hours`.",
        ),
    ] = None,
    until: Annotated[
        AwareDatetime | None,
        Query(description="The window's end (exclusive), ISO 8601 with an offset; default: none (now)."),
    ] = None,
) -> TimeWindow:
    """The window of a town's read: `since_hours`, or `since` and `until`; 422 naming the parameter."""
    try:
        return TimeWindow.resolve(now=datetime.now(UTC), since_hours=since_hours, since=since, until=until)
    except InvalidFilter as error:
        raise _invalid_query(error) from None


SERVE_SETTINGS_VARIABLE: Final = "ACTION_METRICS_SERVE_SETTINGS"
"""How `serve --workers N` hands its settings to its worker processes (`app_from_environment`)."""


def serve_settings(store_url: str | None, *, insecure: bool, lod3_p95_budget_ms: float) -> str:
    """`create_app`'s arguments as `app_from_environment` reads them from `SERVE_SETTINGS_VARIABLE`."""
    return json.dumps(dict(store_url=store_url, insecure=insecure, lod3_p95_budget_ms=lod3_p95_budget_ms))


def app_from_environment() -> FastAPI:
    """The app of one worker process of `serve --workers N` (uvicorn's factory): `create_app` with the
    arguments the command put in `SERVE_SETTINGS_VARIABLE`, tokens from the environment as ever."""
    app = create_app(**json.loads(os.environ[SERVE_SETTINGS_VARIABLE]))
    # What startup made lives as long as the process: out of the garbage collector's reach (see serve).
    gc.freeze()
    return app


def create_app(
    store_url: str | URL | None = None,
    *,
    tokens: ApiTokens | None = None,
    insecure: bool = False,
    limits: IntakeLimits | None = None,
    lod3_p95_budget_ms: float = DEFAULT_LOD3_P95_BUDGET_MS,
) -> FastAPI:
    """The endpoint over the store at `store_url` (default `$ACTION_METRICS_URL`).

    `tokens` default to the environment's. Without any token the app refuses to exist unless
    `insecure`, which serves every town to anyone and is meant for a laptop. `lod3_p95_budget_ms` is
    the SLO that `/v1/town/{town_id}/checks` holds LOD3 queries to.
    """
    tokens = ApiTokens.from_environment() if tokens is None else tokens
    if not tokens and not insecure:
        raise TokenConfigError(
            f"the metrics endpoint needs a bearer token: set {TOKEN_VARIABLE} (or {TOKENS_VARIABLE}), "
            "or pass --insecure to serve without one"
        )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store = AsyncMetricsStore(store_url)
        try:
            await store.open()
        except DatabaseUnavailable as error:
            # Serve anyway: requests answer 503 and the store retries on each one.
            logger.warning("database unavailable at startup, will retry per request: %s", error)
        app.state.store = store
        try:
            yield
        finally:
            await store.close()

    app = FastAPI(
        title="action-metrics",
        summary="Unit economics of an LLM-powered product, per town.",
        version="1",
        lifespan=lifespan,
    )
    app.state.access = Access(tokens, insecure)
    app.state.intake = Intake(IntakeLimits() if limits is None else limits)
    app.include_router(wire.router)

    async def authenticate(credentials: Credentials) -> TokenGrant:
        """The grant of a token that may read (with `insecure`, anyone's: every town)."""
        grant: TokenGrant = app.state.access.grant(credentials, Scope.READ)
        return grant

    async def authorize(town_id: TownId, credentials: Credentials) -> None:
        # The token is checked once the parameters are valid: a bad parameter is 422 for anyone.
        grant = await authenticate(credentials)
        if not grant.allows(town_id):
            raise HTTPException(status.HTTP_403_FORBIDDEN, "this token may not read this town")

    @app.get("/healthz", response_model=Health, tags=["health"])
    async def healthz() -> Health:
        """Liveness: the process answers. Needs no token and touches no database."""
        return Health(status="ok")

    @app.get(
        "/v1/towns",
        response_model=Towns,
        tags=["metrics"],
        responses=READ_ANSWERS,
    )
    async def towns(
        store: Annotated[AsyncMetricsStore, Depends(_store)],
        grant: TokenGrant = Depends(authenticate),  # noqa: B008
    ) -> Towns:
        """The towns this token may read: its listed towns, or every town with recorded actions."""
        if grant.towns is not None:
            return Towns(towns=sorted(grant.towns))
        try:
            rows = await store.breakdown(["town_id"], sort="count")
        except DatabaseError as error:
            raise _unavailable(error) from error
        return Towns(towns=sorted(str(row.keys["town_id"]) for row in rows))

    @app.get(
        "/v1/town/{town_id:town}/metrics",
        response_model=TownMetrics,
        tags=["metrics"],
        dependencies=[Depends(authorize)],
        responses=TOWN_READ_ANSWERS,
    )
    async def town_metrics(
        town_id: TownId,
        store: Annotated[AsyncMetricsStore, Depends(_store)],
        window: Annotated[TimeWindow, Depends(time_window)],
        action_type: Annotated[
            str | None,
            Query(pattern=f"^{ACTION_TYPE_PATTERN}$", description="Only this action type, e.g. lod3."),
        ] = None,
    ) -> dict[str, Any]:
        """The dashboard numbers of one town over the window (the last 24 hours by default)."""
        try:
            aggregate = await store.aggregate(
                town_id=town_id, action_type=action_type, since=window.since, until=window.until
            )
        except DatabaseError as error:
            raise _unavailable(error) from error
        return {
            "town_id": town_id,
            "action_type": action_type,
            "time_window_hours": window.shown_hours,
            "metrics": aggregate.to_dict(),
        }

    @app.get(
        "/v1/town/{town_id:town}/breakdown",
        response_model=TownBreakdown,
        tags=["metrics"],
        dependencies=[Depends(authorize)],
        responses=TOWN_READ_ANSWERS,
    )
    async def town_breakdown(
        town_id: TownId,
        store: Annotated[AsyncMetricsStore, Depends(_store)],
        window: Annotated[TimeWindow, Depends(time_window)],
        by: Annotated[list[Dimension], Query(description="Group by these (repeatable).")] = [],  # noqa: B006
        bucket: Annotated[BucketName | None, Query(description="And by this time bucket, in tz.")] = None,
        tz: Annotated[
            str | None,
            Query(
                pattern=ZONE_PATTERN,
                description="IANA zone of the buckets (default $ACTION_METRICS_TZ, UTC).",
            ),
        ] = None,
        sort: Annotated[SortKey, Query(description="The figure rows are sorted by.")] = "total_cost_usd",
        order: Annotated[
            Literal["desc", "asc"], Query(description="desc: largest first; asc: smallest first.")
        ] = "desc",
        top: Annotated[int | None, Query(ge=1, le=MAX_TOP, description="Keep the first N rows.")] = None,
    ) -> dict[str, Any]:
        """The town's numbers per user, citizen, action type or model and per hour, day, week or month
        in a time zone, over the window (the last 24 hours by default)."""
        try:
            rows = await store.breakdown(
                by,
                bucket=bucket,
                tz=tz,
                sort=sort,
                descending=order == "desc",
                top=top,
                town_id=town_id,
                since=window.since,
                until=window.until,
            )
        except InvalidFilter as error:
            raise _invalid_query(error) from None
        except DatabaseError as error:
            raise _unavailable(error) from error
        return {"town_id": town_id, "rows": [row.to_dict() for row in rows]}

    @app.get(
        "/v1/town/{town_id:town}/checks",
        response_model=TownChecks,
        tags=["metrics"],
        dependencies=[Depends(authorize)],
        responses=TOWN_READ_ANSWERS,
    )
    async def town_checks(
        town_id: TownId,
        store: Annotated[AsyncMetricsStore, Depends(_store)],
        window: Annotated[TimeWindow, Depends(time_window)],
    ) -> TownChecks:
        """The SLO and ethics checks of `report --check` over the town's window (default 24 hours)."""
        try:
            checks = await run_checks(
                store,
                town_id=town_id,
                since=window.since,
                until=window.until,
                lod3_p95_budget_ms=lod3_p95_budget_ms,
            )
        except DatabaseError as error:
            raise _unavailable(error) from error
        return TownChecks(
            town_id=town_id,
            checks=[Check(**check.to_dict()) for check in checks],
            passed=not any_failed(checks),
        )

    async def no_town_segment(request: Request) -> None:
        """Where `/v1/town/./<read>` and `/v1/town/../<read>` arrive once a client resolved them."""
        if "town_id" in request.query_params:  # only more than one reaches here
            raise _invalid_query(InvalidFilter("town_id", "give one town_id, not several"))
        read = request.url.path.rsplit("/", 1)[-1]
        raise HTTPException(status.HTTP_404_NOT_FOUND, _NO_TOWN_SEGMENT.format(read=read))

    for read in TOWN_READS:
        for path in (f"/v1/town/{read}", f"/v1/{read}"):
            app.add_api_route(path, no_town_segment, methods=["GET"], include_in_schema=False)

    add_page(app)
    app.add_middleware(TownIdInQuery)
    return app


Dimension = Literal["user_id", "town_id", "citizen_id", "action_type", "model"]
BucketName = Literal["hour", "day", "week", "month"]
SortKey = Literal[SORT_KEYS]  # type: ignore[valid-type]
ZONE_PATTERN: Final = r"^[A-Za-z][A-Za-z0-9_+\-]*(/[A-Za-z0-9_+\-]+){0,2}$"
MAX_TOP: Final = 100_000
assert set(get_args(Dimension)) == set(DIMENSIONS)
assert set(get_args(BucketName)) == set(BUCKETS)


class TownBreakdown(BaseModel):
    """A town's breakdown: one object per group, holding its keys, `bucket_start` and figures."""

    town_id: str
    rows: list[dict[str, Any]]
