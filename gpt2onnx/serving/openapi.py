"""The server's OpenAPI schema made whole. The routes read their raw bodies (`await request.body()`, parsed by
openai_api.py, so that errors keep OpenAI's shapes), which leaves FastAPI's own schema without request bodies, with
`{}` for every answer and without the error statuses: `complete_schema` adds them, from the same pydantic models
the server validates and answers with, and the bearer key. /openapi.json serves the result; tests/test_fuzz.py
fuzzes the server from it."""

from __future__ import annotations

from .openai_api import Completion, CompletionRequest, DetokenizeRequest, ModelCard, ModelList, TokenizeRequest

ERROR = {"$ref": "#/components/schemas/ErrorResponse"}
ERROR_SCHEMA = {
    "type": "object", "required": ["error"], "properties": {"error": {
        "type": "object", "required": ["message", "type", "param", "code"], "additionalProperties": False,
        "properties": {"message": {"type": "string", "minLength": 1}, "type": {"type": "string", "minLength": 1},
                       "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}},
}
TOKENIZED = {"type": "object", "required": ["count", "max_model_len", "tokens"], "additionalProperties": False,
             "properties": {"count": {"type": "integer", "minimum": 0}, "max_model_len": {"type": "integer"},
                            "tokens": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                            "token_strs": {"type": "array", "items": {"type": "string"}}}}
DETOKENIZED = {"type": "object", "required": ["prompt"], "additionalProperties": False,
               "properties": {"prompt": {"type": "string"}}}
SSE_EVENT = {"type": "object", "required": ["data"],  # each event; its data (a chunk) is checked by test_fuzz
             "properties": {"data": {"type": "string", "minLength": 1}, "event": {"const": "message"}}}
HEALTHY = {"type": "object", "required": ["status"], "properties": {"status": {"const": "ok"}}}
REQUESTS = {"/v1/completions": CompletionRequest, "/tokenize": TokenizeRequest, "/detokenize": DetokenizeRequest,
            "/v1/chat/completions": {"type": "object"}}  # chat: any JSON object (the answer is always 404)
# The statuses each route may answer besides 200: 401 without the key (every route but /health), 503 while the
# model loads or the server drains; a POST: 400 for a bad body, 408 / 413 for a slow or large one, 415 unless JSON
POSTED = (400, 401, 404, 408, 413, 415, 503)
ERRORS = {
    "/health": (503,),
    "/metrics": (401,),
    "/v1/models": (401, 503),
    "/v1/models/{model_id}": (401, 404, 503),
    "/tokenize": POSTED,
    "/detokenize": POSTED,
    "/v1/completions": (*POSTED, 429),
    "/v1/chat/completions": (401, 408, 413, 415),
}


def json_content(schema: dict) -> dict:
    return {"application/json": {"schema": schema}}


def model_schema(model, components: dict, mode: str) -> dict:
    """A pydantic model's JSON schema as an OpenAPI component (its $defs hoisted), returned as a $ref."""
    schema = model.model_json_schema(ref_template="#/components/schemas/{model}", mode=mode)
    components.update(schema.pop("$defs", {}))
    name = model.__name__ + ("Request" if mode == "validation" and not model.__name__.endswith("Request") else "")
    components[name] = schema
    return {"$ref": f"#/components/schemas/{name}"}


def complete_schema(schema: dict, model_name: str) -> dict:
    """`schema` with the request bodies, the response bodies, the error statuses and the bearer key each route has
    (what the schema already declares is kept); model_name: the served name, the example of /v1/models/{id}."""
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["ErrorResponse"] = ERROR_SCHEMA
    answers = {"/health": json_content(HEALTHY), "/metrics": {"text/plain": {"schema": {"type": "string"}}},
               "/v1/models": json_content(model_schema(ModelList, components, "serialization")),
               "/v1/models/{model_id}": json_content(model_schema(ModelCard, components, "serialization")),
               "/tokenize": json_content(TOKENIZED), "/detokenize": json_content(DETOKENIZED),
               "/v1/completions": {**json_content(model_schema(Completion, components, "serialization")),
                                   "text/event-stream": {"schema": SSE_EVENT}}}
    schema.setdefault("components", {}).setdefault("securitySchemes", {"key": {"type": "http", "scheme": "bearer"}})
    schema.setdefault("security", [{"key": []}])
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            if path in REQUESTS and method == "post" and "requestBody" not in operation:
                request = REQUESTS[path]
                body = request if isinstance(request, dict) else model_schema(request, components, "validation")
                operation["requestBody"] = {"required": True, "content": json_content(body)}
            responses = operation["responses"]
            if path == "/v1/chat/completions":  # GPT-2 has no chat template: always OpenAI's 404
                responses.pop("200", None)
                responses["404"] = {"description": "no chat endpoint", "content": json_content(ERROR)}
            elif responses.get("200", {}).get("content", {}).get("application/json", {}).get("schema") == {}:
                responses["200"] = {"description": "the answer", "content": answers[path]}
            responses.pop("422", None)  # FastAPI's: the server answers OpenAI's 400 instead
            for status in ERRORS[path]:
                responses.setdefault(str(status), {"description": "an OpenAI error", "content": json_content(ERROR)})
            if path == "/health":
                operation.setdefault("security", [])
            for parameter in operation.get("parameters", ()):
                if parameter["name"] == "model_id":  # the served name, so that the route's 200 is reached too
                    parameter["schema"].setdefault("examples", [model_name])
    return schema
