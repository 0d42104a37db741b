"""Declared routes: one declaration drives the Klein app *and* the OpenAPI document.

A module that serves HTTP declares its routes on a :class:`RouteTable` held by its
class, and the :class:`cockpit.web.Api` mounts an instance of that class::

    from pydantic import BaseModel
    from cockpit.openapi import ApiError, Param, Reply, Response, RouteTable

    class RepoList(BaseModel):
        repos: list[Repo]

    class ListQuery(BaseModel):            # query parameters: a pydantic model
        limit: int = Field(50, ge=1, le=1000)

    class AysApi:
        routes = RouteTable(tag="ays")      # the tag groups them in the docs

        def __init__(self, robot): ...

        @routes.get("/api/repos", summary="List the AYS repositories",
                    query=ListQuery, responses={200: Response("The repositories", RepoList)})
        def list_repos(self, request, query: ListQuery):
            return {"repos": [...]}          # a dict, list or model: the first 2xx declared

        @routes.post("/api/repos", summary="Create a repository", body=NewRepo,
                     responses={201: Response("The new repository", Repo),
                                409: Response("A repository of that name exists")})
        async def create_repo(self, request, body: NewRepo):
            if exists: raise ApiError(409, f"repository {body.name!r} exists")
            return Reply(201, repo)          # Reply picks another status (and headers)

        @routes.get("/api/repos/{repo}", summary="One repository",
                    params={"repo": Param("The repository's name")},
                    responses={200: Response("The repository", Repo), 404: Response("No such repository")})
        def get_repo(self, request, repo: str): ...

    api.include(AysApi(robot))               # in cockpit.tap, after Api(...) is made

Calling convention: ``handler(self, request, *path_params, query=..., body=...)``, where
``query`` and ``body`` are passed only when declared, already validated (a bad one is a
400 naming the field; a body is read within ``[api] max_body``, JSON unless the route
gives its own ``parse``). A handler returns a dict, list, pydantic model or
:class:`Reply`, or a Deferred/coroutine of one; it raises :class:`ApiError` for a 4xx.
Every route needs a Bearer token when ``[api] tokens`` is set, unless declared
``auth=False``; ``verify=function`` checks a route's own credentials (a webhook's signature):
``function(self, request, raw_body)`` runs before anything else in the request is used and
raises :class:`ApiError`. A declared header is read as UTF-8 text and checked against its
schema's ``pattern``, if any. ``raw=True`` hands the return value to Klein untouched (streams, files); ``branch=True``
routes everything under the path's fixed part to the handler (which returns a resource).
Errors every route can give (400, 401, 408, 413, 415, 503) are added to the document from
what the route declares; list the route's own (404, 409, ...) in ``responses``.
"""
from __future__ import annotations

import copy
import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar, Union

from pydantic import BaseModel, TypeAdapter

from cockpit import events

JSON = "application/json"
Handler = TypeVar("Handler", bound=Callable[..., Any])  # a route's method, kept as it is by its declaration
PATH_PARAM = re.compile(r"{([A-Za-z_][A-Za-z0-9_]*)(?::(path))?}")


class ApiError(Exception):
    """Raised by a handler: answered as ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str, headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


@dataclass
class Reply:
    """A handler's answer with a status other than the route's first 2xx, or with headers."""

    status: int
    payload: Any = None
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Response:
    """One documented status: a description and what the body holds (a model, a type or a schema)."""

    description: str
    model: Any = None  # pydantic model / type / JSON-schema dict; None: an error or no body
    media_type: str = JSON
    example: Any = None


@dataclass(frozen=True)
class Param:
    """A path parameter: its description and JSON schema (a string unless told)."""

    description: str = ""
    schema: dict[str, Any] = field(default_factory=lambda: {"type": "string"})
    required: bool = True  # path parameters always are; a header may be optional


@dataclass(frozen=True)
class Body:
    """A request body: its model, the media types accepted, examples and how raw bytes become a value.

    ``parse(raw, media_type, path_params)`` returns the value handed to the handler; it raises
    ``ApiError`` or ``events.EventError`` (a 400) for bad input. The default parses JSON into ``model``.
    """

    model: Any
    media_types: tuple[str, ...] = (JSON,)
    examples: dict[str, Any] = field(default_factory=dict)  # name -> example value
    parse: Optional[Callable[[bytes, str, dict[str, str]], Any]] = None
    required: bool = True
    description: str = ""


@dataclass
class Route:
    method: str
    path: str  # OpenAPI form: /api/repos/{repo}
    function: Callable[..., Any]
    summary: str
    description: str = ""
    tags: tuple[str, ...] = ()
    params: dict[str, Param] = field(default_factory=dict)
    query: Optional[type[BaseModel]] = None
    body: Optional[Body] = None
    headers: dict[str, Param] = field(default_factory=dict)  # request headers; required ones are checked
    responses: dict[int, Response] = field(default_factory=dict)
    auth: bool = True
    raw: bool = False
    hidden: bool = False  # served, but not in the document (static assets, catch-alls)
    operation_id: str = ""
    branch: bool = False  # a resource serves everything below the path's fixed part (e.g. /store/)
    verify: Optional[Callable[..., None]] = None  # verify(self, request, raw_body): the route's own credentials

    @property
    def path_names(self) -> list[str]:
        return [m.group(1) for m in PATH_PARAM.finditer(self.path)]

    @property
    def klein_path(self) -> str:
        if self.branch:
            return self.path.partition("{")[0]
        return PATH_PARAM.sub(lambda m: f"<{m.group(2) + ':' if m.group(2) else ''}{m.group(1)}>", self.path)

    @property
    def success_status(self) -> int:
        return min((s for s in self.responses if 200 <= s < 300), default=200)


class RouteTable:
    """The routes declared on one class; mount an instance with ``Api.include(instance)``."""

    def __init__(self, tag: Optional[str] = None):
        self.tag = tag
        self.routes: list[Route] = []

    def route(self, method: str, path: str, *, summary: str, description: str = "",
              tags: Optional[tuple[str, ...]] = None, params: Optional[dict[str, Param]] = None,
              query: Optional[type[BaseModel]] = None, body: Union[Body, type[BaseModel], None] = None,
              headers: Optional[dict[str, Param]] = None, responses: Optional[dict[int, Response]] = None,
              auth: bool = True, raw: bool = False, hidden: bool = False, branch: bool = False,
              operation_id: Optional[str] = None,
              verify: Optional[Callable[..., None]] = None) -> Callable[[Handler], Handler]:
        """Declare the decorated method as ``method path``; see the module docstring."""
        if body is not None and not isinstance(body, Body):
            body = Body(body)

        def declare(function: Handler) -> Handler:
            route = Route(method.upper(), path, function, summary, description,
                          tags if tags is not None else ((self.tag,) if self.tag else ()),
                          dict(params or {}), query, body, dict(headers or {}), dict(responses or {}),
                          auth, raw, hidden, operation_id or function.__name__, branch, verify)
            for name in route.path_names:
                route.params.setdefault(name, Param())
            unknown = set(route.params) - set(route.path_names)
            if unknown:
                raise ValueError(f"{method} {path}: parameters {sorted(unknown)} are not in the path")
            self.routes.append(route)
            return function

        return declare

    def get(self, path: str, **spec: Any) -> Callable[[Handler], Handler]:
        return self.route("GET", path, **spec)

    def post(self, path: str, **spec: Any) -> Callable[[Handler], Handler]:
        return self.route("POST", path, **spec)

    def put(self, path: str, **spec: Any) -> Callable[[Handler], Handler]:
        return self.route("PUT", path, **spec)

    def delete(self, path: str, **spec: Any) -> Callable[[Handler], Handler]:
        return self.route("DELETE", path, **spec)


# ---------------------------------------------------------------------------
# The document
# ---------------------------------------------------------------------------

class ErrorReply(BaseModel):
    """Every error: what went wrong, in words."""

    error: str


_STANDARD_ERRORS = {
    400: "Invalid input; the message names the field",
    401: "No or wrong Bearer token (when [api] tokens is set)",
    408: "The body did not arrive within [api] body_timeout",
    413: "The body is larger than [api] max_body",
    415: "Unsupported Content-Type",
    503: "The bus cannot take it now (Redis unreachable); retry later",
}


class _Schemas:
    """Collects component schemas; returns a schema (a $ref where it can) for each model or type."""

    def __init__(self) -> None:
        self.components: dict[str, Any] = {}
        for name, schema in events.json_schemas().items():
            self.components[name] = schema

    def of(self, model: Any) -> dict[str, Any]:
        if model is None:
            return {}
        if isinstance(model, dict):
            return model
        ref = "#/components/schemas/{model}"
        if isinstance(model, type) and issubclass(model, BaseModel):
            name = model.__name__
            if name not in self.components:
                schema = model.model_json_schema(by_alias=True, ref_template=ref)
                for sub, value in schema.pop("$defs", {}).items():
                    self.components.setdefault(sub, value)
                self.components[name] = schema
            return {"$ref": ref.format(model=name)}
        schema = TypeAdapter(model).json_schema(by_alias=True, ref_template=ref)
        for sub, value in schema.pop("$defs", {}).items():
            self.components.setdefault(sub, value)
        return schema


def _query_parameters(model: type[BaseModel], schemas: _Schemas) -> list[dict[str, Any]]:
    schema = model.model_json_schema(by_alias=True, ref_template="#/components/schemas/{model}")
    for sub, value in schema.pop("$defs", {}).items():
        schemas.components.setdefault(sub, value)
    required = set(schema.get("required", []))
    parameters = []
    for name, prop in schema.get("properties", {}).items():
        prop = dict(prop)
        description = prop.pop("description", "")
        prop.pop("title", None)
        parameter = {"name": name, "in": "query", "required": name in required, "schema": prop}
        if description:
            parameter["description"] = description
        parameters.append(parameter)
    return parameters


def _response(response: Response, schemas: _Schemas, status: int) -> dict[str, Any]:
    out: dict[str, Any] = {"description": response.description}
    model = response.model
    if model is None and status >= 400:
        model = ErrorReply
    if model is not None:
        content: dict[str, Any] = {"schema": schemas.of(model)}
        if response.example is not None:
            content["example"] = response.example
        out["content"] = {response.media_type: content}
    return out


def document(routes: list[Route], title: str, version: str, description: str = "") -> dict[str, Any]:
    """The OpenAPI 3.1 document for ``routes`` (those not hidden)."""
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    tags: list[str] = []
    for route in routes:
        if route.hidden:
            continue
        op: dict[str, Any] = {"operationId": route.operation_id, "summary": route.summary}
        if route.description:
            op["description"] = route.description
        if route.tags:
            op["tags"] = list(route.tags)
            tags.extend(t for t in route.tags if t not in tags)
        parameters = [{"name": name, "in": "path", "required": True, "schema": param.schema,
                       **({"description": param.description} if param.description else {})}
                      for name, param in route.params.items()]
        if route.query is not None:
            parameters.extend(_query_parameters(route.query, schemas))
        parameters.extend({"name": name, "in": "header", "required": param.required, "schema": param.schema,
                           **({"description": param.description} if param.description else {})}
                          for name, param in route.headers.items())
        if parameters:
            op["parameters"] = parameters
        responses = dict(route.responses) or {200: Response("OK")}
        implied = []
        if route.body is not None:
            body = route.body
            schema = schemas.of(body.model)
            content = {}
            for media_type in body.media_types:
                entry: dict[str, Any] = {"schema": schema}
                if body.examples:
                    entry["examples"] = {name: {"value": value} for name, value in body.examples.items()}
                content[media_type] = entry
            op["requestBody"] = {"required": body.required, "content": content,
                                 **({"description": body.description} if body.description else {})}
            implied += [400, 408, 413, 415]
        if route.query is not None or route.params or any(p.required for p in route.headers.values()):
            implied.append(400)
        if route.auth:
            implied.append(401)
            op["security"] = [{"bearer": []}]
        else:
            op["security"] = []
        for status in implied:
            responses.setdefault(status, Response(_STANDARD_ERRORS[status]))
        op["responses"] = {str(status): _response(responses[status], schemas, status)
                           for status in sorted(responses)}
        paths.setdefault(route.path, {})[route.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version, **({"description": description} if description else {})},
        "tags": [{"name": t} for t in tags],
        "paths": paths,
        "components": {
            "schemas": dict(sorted(schemas.components.items())),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "One of [api] tokens"}},
        },
    }


# ---------------------------------------------------------------------------
# For Swagger UI: the bundled release renders OpenAPI 3.0 only
# ---------------------------------------------------------------------------

def _schema_30(node: Any) -> Any:
    if isinstance(node, list):
        return [_schema_30(item) for item in node]
    if not isinstance(node, dict):
        return node
    node = {key: _schema_30(value) for key, value in node.items()}
    for key in ("anyOf", "oneOf"):
        options = node.get(key)
        if isinstance(options, list) and {"type": "null"} in options:
            rest = [o for o in options if o != {"type": "null"}]
            del node[key]
            if len(rest) == 1 and "$ref" not in rest[0]:
                node.update(rest[0])
            elif len(rest) == 1:
                node["allOf"] = rest
            else:
                node[key] = rest
            node["nullable"] = True
    kind = node.get("type")
    if isinstance(kind, list):
        kinds = [k for k in kind if k != "null"]
        node["type"] = kinds[0] if len(kinds) == 1 else kinds[0]
        if "null" in kind:
            node["nullable"] = True
    if "const" in node:
        node["enum"] = [node.pop("const")]
    if isinstance(node.get("examples"), list):
        examples = node.pop("examples")
        if examples:
            node["example"] = examples[0]
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(node.get(bound), (int, float)) and not isinstance(node.get(bound), bool):
            node[plain] = node.pop(bound)
            node[bound] = True
    return node


def downgrade_to_30(doc: dict[str, Any]) -> dict[str, Any]:
    """The same document in OpenAPI 3.0 terms, for Swagger UI 4 (which refuses 3.1)."""
    out = copy.deepcopy(doc)
    out["openapi"] = "3.0.3"
    out["components"]["schemas"] = _schema_30(out["components"]["schemas"])
    for item in out["paths"].values():
        for op in item.values():
            for parameter in op.get("parameters", []):
                parameter["schema"] = _schema_30(parameter["schema"])
            for holder in [op.get("requestBody", {})] + list(op["responses"].values()):
                for media in holder.get("content", {}).values():
                    media["schema"] = _schema_30(media["schema"])
    return out


# ---------------------------------------------------------------------------
# Swagger UI, from the swagger-ui-bundle package: nothing is fetched from elsewhere
# ---------------------------------------------------------------------------

# 'self' only: the page cannot reach any other host, even by a link in the document
DOCS_CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; "
            "script-src 'self'; connect-src 'self'; font-src 'self' data:; frame-ancestors 'self'; "
            "form-action 'self'; base-uri 'none'")

_DOCS_PAGE = b"""<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>Cockpit API</title>
    <link rel="stylesheet" type="text/css" href="/api/docs/swagger-ui.css">
    <link rel="icon" type="image/png" href="/api/docs/favicon-32x32.png" sizes="32x32">
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="/api/docs/swagger-ui-bundle.js" charset="UTF-8"></script>
    <script src="/api/docs/swagger-initializer.js" charset="UTF-8"></script>
  </body>
</html>
"""

# validatorUrl null: no badge, so no request to the public validator
_DOCS_INIT = b"""window.onload = function () {
  window.ui = SwaggerUIBundle({
    url: "/api/docs/openapi-3.0.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    docExpansion: "list",
    presets: [SwaggerUIBundle.presets.apis],
    layout: "BaseLayout"
  });
};
"""

_DOCS_FILES = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
}


def docs_asset(name: str, doc: Callable[[], dict[str, Any]]) -> Optional[tuple[str, bytes]]:
    """``(content type, bytes)`` of one file of the docs page, or None; ``doc()`` gives the document."""
    import json

    if name in ("", "index.html"):
        return "text/html; charset=utf-8", _DOCS_PAGE
    if name == "swagger-initializer.js":
        return "text/javascript; charset=utf-8", _DOCS_INIT
    if name == "openapi-3.0.json":
        return JSON, json.dumps(downgrade_to_30(doc())).encode()
    if name in _DOCS_FILES:
        return _DOCS_FILES[name], _bundle_file(name)
    return None


@functools.lru_cache(maxsize=None)
def _bundle_file(name: str) -> bytes:
    """A file of the swagger-ui-bundle package: read once, not on the reactor thread per request."""
    from swagger_ui_bundle import swagger_ui_path

    path: Path = swagger_ui_path / name  # the package has no annotations
    return path.read_bytes()
