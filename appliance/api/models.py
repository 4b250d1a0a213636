"""The model list (GET /v1/models, /v1/models/{id}): the models and LoRA adapters the
box serves, to a caller with a key (or the admin credential)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from litestar import Request, Response, get

from appliance.api.callers import client_or_admin
from appliance.errors import ModelNotFound
from appliance.gateway.protocol import ModelCard, ModelList

if TYPE_CHECKING:
    from appliance.api.app import Runtime

JSON = "application/json"


@get("/v1/models")
async def list_models(request: Request) -> Response[ModelList]:
    rt = client_or_admin(request)
    created = int(rt.started)
    cards = [_model_card(rt, name, created) for name in rt.supervisor.model_names()]
    return Response(ModelList(data=cards), media_type=JSON)


def _model_card(rt: Runtime, name: str, created: int) -> ModelCard:
    """A model, or a LoRA adapter (its base model as its parent)."""
    base = rt.supervisor.adapters.get(name)
    return ModelCard(id=name, created=created, parent=base.model.name if base is not None else None)


@get("/v1/models/{model_id:path}")
async def get_model(request: Request) -> Response[ModelCard]:
    rt = client_or_admin(request)
    name = str(request.path_params["model_id"]).lstrip("/")
    if rt.supervisor.find(name) is None:
        raise ModelNotFound(name)  # 404 in the envelope
    return Response(_model_card(rt, name, int(rt.started)), media_type=JSON)
