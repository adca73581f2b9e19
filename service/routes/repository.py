"""Model control over HTTP, as Triton's repository extension: the index, load and unload. Only in explicit mode and
only with the admin key (a Bearer token of its own: the API key lets a client classify, not change what is served)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import APIRouter, Body, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from service import repository
from service.errors import ServiceError
from service.schemas import ErrorBody
from service.state import State, StateDep


async def check_admin(request: Request, state: StateDep) -> None:
    settings = state.settings
    if settings.model_control_mode != "explicit" or settings.admin_key is None:
        raise ServiceError(
            403,
            "forbidden",
            "model control is off: start the service with --model-control-mode "
            "explicit (FPET_MODEL_CONTROL_MODE) and FPET_ADMIN_KEY",
        )
    auth = request.headers.get("authorization", "")
    if not auth.lower().startswith("bearer "):
        raise ServiceError(401, "unauthorized", "model control needs the admin key: Authorization: Bearer KEY")
    if not hmac.compare_digest(auth[7:].strip().encode(), settings.admin_key.get_secret_value().encode()):
        raise ServiceError(403, "forbidden", "the admin key is wrong")


router = APIRouter(
    prefix="/v2/repository",
    tags=["model control"],
    dependencies=[Depends(check_admin)],
    responses={401: {"model": ErrorBody}, 403: {"model": ErrorBody}},
)


class IndexRequest(BaseModel):
    ready: bool = Field(False, description="only the models ready to serve")


class LoadParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")
    uri: str | None = Field(
        None,
        description="a bundle folder, an archive path, file:// or http(s):// URI; "
        "without it the model is loaded again from where it was",
    )


class LoadRequest(BaseModel):
    parameters: LoadParameters = Field(default_factory=LoadParameters)


def described(state: State, name: str) -> dict:
    return next(e for e in repository.index(state) if e["name"] == name)


@router.post("/index", summary="Models served or asked about, with their state")
async def index(state: StateDep, body: Annotated[IndexRequest | None, Body()] = None) -> list[dict]:
    return repository.index(state, ready_only=body is not None and body.ready)


@router.post(
    "/models/{model}/load",
    summary="Load a model, or a new version of it, without a restart",
    responses={400: {"model": ErrorBody}},
)
async def load(state: StateDep, model: str, body: Annotated[LoadRequest | None, Body()] = None) -> dict:
    runner = await repository.load(state, model, (body or LoadRequest()).parameters.uri)
    return {**described(state, model), "load_seconds": runner.load_seconds, "warmup_seconds": runner.warmup_seconds}


@router.post(
    "/models/{model}/unload",
    summary="Stop serving a model once what it holds is answered",
    responses={404: {"model": ErrorBody}},
)
async def unload(state: StateDep, model: str) -> dict:
    await repository.unload(state, model)
    return described(state, model)
