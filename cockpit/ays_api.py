"""The AYS REST routes (docs/design.md §5): repositories, templates, blueprints, services, action runs.

Thin: each route validates its input and calls the catalog (:class:`cockpit.ays_catalog.Catalog`)
or, for what runs, the robot (:class:`cockpit.ays.Robot`). What the catalog shows is current:
a read first brings its view up to every change made before it, in any process. Their errors
map to statuses here, once: NotFound 404, Conflict 409, Invalid 400, Unavailable 503.
Mounted with ``api.include(AysApi(robot, catalog))``.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, Callable, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field
from twisted.internet import defer
from twisted.web.server import Request

from cockpit.openapi import ApiError, Body, Param, Reply, Response, RouteTable
from cockpit.repos import (BLUEPRINT_INPUT_PATTERN, NAME_PATTERN, REPO_PATTERN, TEMPLATE_FILES, AysError, Conflict,
                           Invalid, NotFound, Unavailable)
from cockpit.runs import STATES

RunState = Literal["new", "running", "ok", "error", "timeout"]
assert set(RunState.__args__) == set(STATES)  # type: ignore[attr-defined]

# -- bodies and replies ------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _name_schema(pattern: str, example: str) -> dict[str, Any]:
    """What the document says a name looks like; the robot checks it and says why when it does not."""
    return {"type": "string", "pattern": pattern, "examples": [example]}


# the example names are those of the README's walk-through
REPO_NAME = _name_schema(REPO_PATTERN, "demo")
BLUEPRINT_NAME = _name_schema(BLUEPRINT_INPUT_PATTERN, "main.yaml")


class NewRepo(_Strict):
    name: str = Field(description="1 to 64 letters, digits, spaces, '_', '.' or '-'", json_schema_extra=REPO_NAME)


class Repo(BaseModel):
    name: str
    created: Optional[float] = None
    templates: list[str]
    broken_templates: dict[str, str] = Field(description="template -> why it cannot be loaded")
    services: list[str] = Field(description="role!instance of each service")
    blueprints: dict[str, Any] = Field(description="blueprint -> its last execution: state, error, executed")


class RepoList(BaseModel):
    repos: list[Repo]


class TemplateFiles(_Strict):
    files: dict[str, str] = Field(description="Some of " + ", ".join(TEMPLATE_FILES) + " -> the file's text; "
                                  "files not given are removed")


class Argument(BaseModel):
    type: str
    default: Any = None
    required: bool
    description: str


class Template(BaseModel):
    name: str
    repo: str
    actions: list[str] = []
    events: dict[str, list[str]] = Field({}, description="event type -> actions run for it")
    recurring: dict[str, float] = Field({}, description="action -> period in seconds")
    schema_: dict[str, Argument] = Field({}, alias="schema")
    files: Optional[dict[str, str]] = None
    error: Optional[str] = Field(None, description="Why a template on disk cannot be loaded")


class TemplateList(BaseModel):
    templates: list[Template]


class NewBlueprint(_Strict):
    name: str = Field(description="main.yaml (.yaml is added when missing)", json_schema_extra=BLUEPRINT_NAME)
    content: str = Field(description="YAML: template__instance: {args} blocks")


class BlueprintContent(_Strict):
    content: str


class Blueprint(BaseModel):
    name: str
    repo: str
    content: Optional[str] = None
    state: str = Field(description="new, running, ok or error (of its last execution)")
    error: Optional[str] = None
    executed: Optional[float] = None


class BlueprintList(BaseModel):
    blueprints: list[Blueprint]


class Trigger(BaseModel):
    kind: Literal["event", "rest", "telegram", "recurring", "blueprint"]
    event_type: Optional[str] = None
    event_guid: Optional[str] = None


class Run(BaseModel):
    id: str
    repo: str
    service: Optional[str] = Field(description="role!instance; null for a chat command the robot did itself")
    action: str
    state: RunState
    trigger: Trigger
    started: Optional[float] = None
    ended: Optional[float] = None
    log: str
    result: Any = None


class RunList(BaseModel):
    runs: list[Run]
    next: Optional[str] = Field(None, description="Pass as `before` for the next page; null at the end.")


class ExecutedBlueprint(BaseModel):
    runs: list[Run] = Field(description="The install runs started, in blueprint order")


class Service(BaseModel):
    key: str = Field(description="role!instance")
    repo: str
    role: str
    instance: str
    template: str
    args: dict[str, Any]
    states: dict[str, str] = Field(description="action -> new, running, ok, error or timeout")
    events: dict[str, list[str]]
    recurring: dict[str, float]
    created: float
    updated: float
    blueprint: Optional[str] = None


class ServiceList(BaseModel):
    services: list[Service]


class ActionArgs(_Strict):
    args: dict[str, Any] = Field({}, description="Given to the action as event.args (a generic event)")


class RunStarted(BaseModel):
    run: str


class LimitQuery(BaseModel):
    model_config = ConfigDict(extra="ignore")
    limit: int = Field(50, ge=1, le=1000, description="At most this many.")


class RunQuery(LimitQuery):
    before: Optional[str] = Field(None, max_length=64, description="Paging: the `next` of the previous page.")
    repo: Optional[str] = Field(None, max_length=200)
    service: Optional[str] = Field(None, max_length=200, description="role!instance")
    action: Optional[str] = Field(None, max_length=200)
    state: Optional[RunState] = None
    event_guid: Optional[str] = Field(None, max_length=200)


# -- errors -----------------------------------------------------------------------------

def _api_error(exc: AysError) -> ApiError:
    if isinstance(exc, Unavailable):
        return ApiError(503, str(exc), {"Retry-After": "5"})
    status = 404 if isinstance(exc, NotFound) else 409 if isinstance(exc, Conflict) else 400
    return ApiError(status, str(exc))


def _translated(function: Callable[..., Any]) -> Callable[..., Any]:
    """Map the robot's errors to API errors, raised now or later."""
    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            result = function(*args, **kwargs)
        except AysError as exc:
            raise _api_error(exc) from None
        if inspect.iscoroutine(result):
            result = defer.ensureDeferred(result)
        if isinstance(result, defer.Deferred):
            def translate(failure: Any) -> Any:
                failure.trap(AysError)
                raise _api_error(failure.value)
            result.addErrback(translate)
        return result
    return wrapper


REPO = {"repo": Param("The repository's name", REPO_NAME)}
TEMPLATE = {**REPO, "name": Param("The template's name (its role)", _name_schema(NAME_PATTERN, "mailbox"))}
BLUEPRINT = {**REPO, "name": Param("The blueprint's name, e.g. main.yaml", BLUEPRINT_NAME)}
# not {instance}: Klein hands its own "instance" argument to every route
SERVICE = {**REPO, "role": Param("The service's role (its template)", _name_schema(NAME_PATTERN, "mailbox")),
           "name": Param("The instance's name", _name_schema(NAME_PATTERN, "ops"))}
NO_REPO = {404: Response("No such repository")}
BAD = {400: Response("Invalid input; the message says what")}


class AysApi:
    """The AYS routes, around a robot and its catalog (``robot.catalog`` unless given)."""

    routes = RouteTable(tag="ays")

    def __init__(self, robot: Any, catalog: Any = None):
        self.robot = robot
        self.catalog: Any = catalog if catalog is not None else getattr(robot, "catalog", None)

    def _read(self, read: Callable[[Any], Any]) -> Any:
        """``read(catalog)`` once the catalog's view is current."""
        return self.catalog.view().addCallback(read)

    # -- repositories -----------------------------------------------------------------------
    @routes.get("/api/repos", summary="List the AYS repositories", query=LimitQuery,
                responses={200: Response("The repositories, by name", RepoList)})
    @_translated
    def list_repos(self, request: Request, query: LimitQuery) -> Any:
        return self._read(lambda catalog: {"repos": catalog.list_repos()[:query.limit]})

    @routes.post("/api/repos", summary="Create a repository", body=NewRepo,
                 responses={201: Response("The new repository", Repo),
                            409: Response("A repository of that name exists"), **BAD})
    @_translated
    def create_repo(self, request: Request, body: NewRepo) -> Any:
        return self.catalog.create_repo(body.name)

    @routes.get("/api/repos/{repo}", summary="One repository", params=REPO,
                responses={200: Response("The repository", Repo), **NO_REPO})
    @_translated
    def get_repo(self, request: Request, repo: str) -> Any:
        return self._read(lambda catalog: catalog.get_repo(repo))

    @routes.delete("/api/repos/{repo}", summary="Delete a repository with everything in it", params=REPO,
                   responses={204: Response("Deleted"), **NO_REPO})
    @_translated
    def delete_repo(self, request: Request, repo: str) -> Any:
        return self.catalog.delete_repo(repo).addCallback(lambda _: Reply(204))

    # -- templates ---------------------------------------------------------------------------
    @routes.get("/api/repos/{repo}/templates", summary="The repository's service templates", params=REPO,
                query=LimitQuery, responses={200: Response("The templates, by name", TemplateList), **NO_REPO})
    @_translated
    def list_templates(self, request: Request, repo: str, query: LimitQuery) -> Any:
        return self._read(lambda catalog: {"templates": catalog.list_templates(repo)[:query.limit]})

    @routes.get("/api/repos/{repo}/templates/{name}", summary="One template, with its files", params=TEMPLATE,
                responses={200: Response("The template", Template),
                           404: Response("No such repository or template")})
    @_translated
    def get_template(self, request: Request, repo: str, name: str) -> Any:
        return self._read(lambda catalog: catalog.get_template(repo, name))

    @routes.put("/api/repos/{repo}/templates/{name}", summary="Create or replace a template's files",
                params=TEMPLATE, body=TemplateFiles,
                responses={200: Response("The template, replaced", Template),
                           201: Response("The template, created", Template), **NO_REPO, **BAD})
    @_translated
    def put_template(self, request: Request, repo: str, name: str, body: TemplateFiles) -> Any:
        d = self.catalog.put_template(repo, name, body.files)
        return d.addCallback(lambda result: Reply(201 if result[1] else 200, result[0]))

    # -- blueprints --------------------------------------------------------------------------
    @routes.get("/api/repos/{repo}/blueprints", summary="The repository's blueprints", params=REPO,
                query=LimitQuery, responses={200: Response("The blueprints, by name", BlueprintList), **NO_REPO})
    @_translated
    def list_blueprints(self, request: Request, repo: str, query: LimitQuery) -> Any:
        return self._read(lambda catalog: {"blueprints": catalog.list_blueprints(repo)[:query.limit]})

    @routes.post("/api/repos/{repo}/blueprints", summary="Add a blueprint", params=REPO, body=NewBlueprint,
                 responses={201: Response("The blueprint", Blueprint),
                            409: Response("A blueprint of that name exists"), **NO_REPO, **BAD})
    @_translated
    def create_blueprint(self, request: Request, repo: str, body: NewBlueprint) -> Any:
        return self.catalog.add_blueprint(repo, body.name, body.content, create=True)

    @routes.get("/api/repos/{repo}/blueprints/{name}", summary="One blueprint, with its last execution",
                params=BLUEPRINT, responses={200: Response("The blueprint", Blueprint),
                                             404: Response("No such repository or blueprint")})
    @_translated
    def get_blueprint(self, request: Request, repo: str, name: str) -> Any:
        return self._read(lambda catalog: catalog.get_blueprint(repo, name))

    @routes.put("/api/repos/{repo}/blueprints/{name}", summary="Replace a blueprint's content",
                params=BLUEPRINT, body=BlueprintContent,
                responses={200: Response("The blueprint", Blueprint),
                           404: Response("No such repository or blueprint"), **BAD})
    @_translated
    def update_blueprint(self, request: Request, repo: str, name: str, body: BlueprintContent) -> Any:
        return self.catalog.add_blueprint(repo, name, body.content, create=False)

    @routes.delete("/api/repos/{repo}/blueprints/{name}", summary="Delete a blueprint (its services stay)",
                   params=BLUEPRINT, responses={204: Response("Deleted"),
                                                404: Response("No such repository or blueprint")})
    @_translated
    def delete_blueprint(self, request: Request, repo: str, name: str) -> Any:
        return self.catalog.delete_blueprint(repo, name).addCallback(lambda _: Reply(204))

    @routes.post("/api/repos/{repo}/blueprints/{name}/execute",
                 summary="Create or update the blueprint's services, then run their install actions in order",
                 description="A blueprint that fails keeps its error (see its state); it is never deleted.",
                 params=BLUEPRINT,
                 responses={202: Response("The install runs started", ExecutedBlueprint),
                            404: Response("No such repository or blueprint"),
                            400: Response("The blueprint cannot be executed; the message says why")})
    @_translated
    def execute_blueprint(self, request: Request, repo: str, name: str) -> Any:
        d = self.robot.execute_blueprint(repo, name)
        return d.addCallback(lambda started: Reply(202, {"runs": [run.to_dict() for run in started[0]]}))

    # -- services ----------------------------------------------------------------------------
    @routes.get("/api/repos/{repo}/services", summary="The repository's services", params=REPO,
                query=LimitQuery, responses={200: Response("The services, by key", ServiceList), **NO_REPO})
    @_translated
    def list_services(self, request: Request, repo: str, query: LimitQuery) -> Any:
        return self._read(lambda catalog: {"services": catalog.list_services(repo)[:query.limit]})

    @routes.get("/api/repos/{repo}/services/{role}/{name}", summary="One service", params=SERVICE,
                responses={200: Response("The service", Service), 404: Response("No such repository or service")})
    @_translated
    def get_service(self, request: Request, repo: str, role: str, name: str) -> Any:
        return self._read(lambda catalog: catalog.get_service(repo, f"{role}!{name}"))

    @routes.delete("/api/repos/{repo}/services/{role}/{name}", summary="Delete a service", params=SERVICE,
                   responses={204: Response("Deleted"), 404: Response("No such repository or service")})
    @_translated
    def delete_service(self, request: Request, repo: str, role: str, name: str) -> Any:
        return self.catalog.delete_service(repo, f"{role}!{name}").addCallback(lambda _: Reply(204))

    @routes.post("/api/repos/{repo}/services/{role}/{name}/actions/{action}",
                 summary="Run one action of a service",
                 params={**SERVICE, "action": Param("The action's name: a function in the template's actions.py",
                                                    {"type": "string", "examples": ["install"]})},
                 body=Body(ActionArgs, required=False),
                 responses={202: Response("The run, started", RunStarted),
                            404: Response("No such repository, service or action")})
    @_translated
    def run_action(self, request: Request, repo: str, role: str, name: str, action: str,
                   body: Optional[ActionArgs] = None) -> Any:
        def start(_: Any) -> Reply:
            run, _ = self.robot.run_action(repo, f"{role}!{name}", action, body.args if body else {})
            return Reply(202, {"run": run.id})

        return self._read(start)

    # -- runs --------------------------------------------------------------------------------
    @routes.get("/api/runs", summary="Run history with logs, newest first (runs still going included)",
                query=RunQuery, responses={200: Response("The runs", RunList)})
    def list_runs(self, request: Request, query: RunQuery) -> Any:
        filters = query.model_dump(exclude={"limit", "before"})
        d = self.robot.list_runs(limit=query.limit, before=query.before, **filters)
        return d.addCallback(lambda runs: {"runs": runs,
                                           "next": runs[-1]["id"] if len(runs) == query.limit else None})

    @routes.get("/api/runs/{id}", summary="One run, with its log", params={"id": Param("The run's id")},
                responses={200: Response("The run", Run), 404: Response("No such run")})
    @_translated
    def get_run(self, request: Request, id: str) -> Any:
        return self.robot.get_run(id)


__all__ = ["AysApi", "Invalid"]
