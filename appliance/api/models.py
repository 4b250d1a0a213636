"""The model list (GET /v1/models, /v1/models/{id}): the models and LoRA adapters the
box serves and the model names its routes give them, to a caller with a key (or the
admin credential). A key sees only the names it may call (its routes: Routes.allows);
any other is unknown to it (a 404).

Two APIs share these paths: OpenAI's cards by default, Anthropic's model objects (and
its cursor pages and error envelope) to a request that says it speaks Anthropic's API,
as its SDKs do on every request (the ``anthropic-version`` header)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import TYPE_CHECKING

import msgspec
from litestar import Request, Response, get

from appliance.api.callers import caller, deployment_of, models_of
from appliance.config import request_context
from appliance.errors import BadRequest, ModelNotFound, quoted
from appliance.gateway.dialects import ANTHROPIC, Dialect
from appliance.gateway.protocol import ModelCard, ModelList

if TYPE_CHECKING:
    from appliance.api.app import Runtime

JSON = "application/json"
PATH = "/v1/models"
# Anthropic's page size: 20 unless ?limit= says otherwise, at most 1000.
DEFAULT_LIMIT, MAX_LIMIT = 20, 1000


class AnthropicModel(msgspec.Struct):
    """A model as Anthropic's Models API shows it."""

    id: str
    display_name: str
    created_at: str  # RFC 3339: when this daemon started serving it
    max_input_tokens: int | None = None
    lifecycle: str = "active"
    type: str = "model"


class AnthropicModelPage(msgspec.Struct):
    """One page of Anthropic's model list: the next is after last_id (before first_id)."""

    data: list[AnthropicModel]
    has_more: bool
    first_id: str | None
    last_id: str | None


def request_dialect(request: Request) -> Dialect | None:
    """Anthropic's, for a model-list request from its SDK; else None (the path's)."""
    if request.url.path.startswith(PATH) and "anthropic-version" in request.headers:
        return ANTHROPIC
    return None


def _anthropic(content: AnthropicModelPage | AnthropicModel, request: Request) -> Response:
    """An answer in Anthropic's shape, naming its request's id as its SDKs read it
    (request-id; the front door adds X-Request-Id to every answer)."""
    rid = request.scope.get("request_id")
    return Response(content, media_type=JSON, headers=ANTHROPIC.id_headers(rid) if isinstance(rid, str) else None)


@get(PATH)
async def list_models(request: Request) -> Response[ModelList | AnthropicModelPage]:
    rt, key = caller(request)
    names = models_of(rt, key)
    if request_dialect(request) is ANTHROPIC:
        page, has_more = _page(names, request)
        cards = [_anthropic_model(rt, name) for name in page]
        first, last = (page[0], page[-1]) if page else (None, None)
        return _anthropic(AnthropicModelPage(cards, has_more, first, last), request)
    created = int(rt.started)
    return Response(ModelList(data=[_model_card(rt, name, created) for name in names]), media_type=JSON)


def _model_card(rt: Runtime, name: str, created: int) -> ModelCard:
    """A model, or a LoRA adapter (its base model as its parent)."""
    base = rt.supervisor.adapters.get(name)
    return ModelCard(id=name, created=created, parent=base.model.name if base is not None else None)


def _anthropic_model(rt: Runtime, name: str) -> AnthropicModel:
    dep = deployment_of(rt, name)
    started = datetime.fromtimestamp(int(rt.started), UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    # What one request may send: llama.cpp shares context_length among its slots.
    context = request_context(dep.model) if dep is not None else None
    return AnthropicModel(id=name, display_name=name, created_at=started, max_input_tokens=context)


def _page(names: list[str], request: Request) -> tuple[list[str], bool]:
    """Anthropic's cursor page: up to ?limit= names after ?after_id= (or just before
    ?before_id=), and whether more lie beyond it that way."""
    query = request.query_params
    raw = query.get("limit", str(DEFAULT_LIMIT))
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}, not {quoted(raw)}", param="limit")
    limit = int(raw)
    if (before := query.get("before_id")) is not None:
        names = names[: _cursor(names, before, "before_id")]
        return names[-limit:], len(names) > limit
    if (after := query.get("after_id")) is not None:
        names = names[_cursor(names, after, "after_id") + 1 :]
    return names[:limit], len(names) > limit


def _cursor(names: list[str], name: str, param: str) -> int:
    try:
        return names.index(name)
    except ValueError:
        raise BadRequest(f"{param} {quoted(name)} is no model served here", param=param) from None


@get(f"{PATH}/{{model_id:path}}")
async def get_model(request: Request) -> Response[ModelCard | AnthropicModel]:
    rt, key = caller(request)
    name = str(request.path_params["model_id"]).lstrip("/")
    if name not in models_of(rt, key):
        raise ModelNotFound(name)  # 404 in the envelope, as for a model not served
    if request_dialect(request) is ANTHROPIC:
        return _anthropic(_anthropic_model(rt, name), request)
    return Response(_model_card(rt, name, int(rt.started)), media_type=JSON)
