"""The FastAPI application of `saeworks serve` (the endpoints are listed in __init__.py).

Handlers are plain functions: FastAPI runs them in its thread pool, each thread with its own
database handles (catalog.py). Expected failures map to status codes with a one-line message in
`detail`: an unknown dictionary 404, a bad value 422, a malformed full-text query 400, a busy
model 503 with Retry-After, a label edit on a read-only service 403, a missing token 401.
"""

from __future__ import annotations

import gzip
import hmac
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.middleware.cors import CORSMiddleware
from fastapi.middleware.trustedhost import TrustedHostMiddleware
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi_offline import FastAPIOffline

from saeworks.eval.dictionary import DictionaryError, FeatureNotFoundError, SearchSyntaxError
from saeworks.sae.version import package_version
from saeworks.service import records
from saeworks.service.catalog import ServedDictionary, open_catalog
from saeworks.service.gate import QueueFull
from saeworks.service.schemas import (
    MAX_PER_PAGE,
    STEER_METHODS,
    ActivationRequest,
    InspectRequest,
    LabelEdit,
    SteerRequest,
)
from saeworks.steer.generate import Completion, generate
from saeworks.steer.interventions import FeatureIntervention, InterventionError
from saeworks.steer.settings import GenerationError, GenerationSettings

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
TOKEN_COOKIE = "saeworks_token"
LOOPBACK_HOSTS = ["127.0.0.1", "localhost", "::1", "[::1]"]
DOCS_ASSETS = "/static-offline-docs"
"""Where fastapi-offline serves Swagger UI's and ReDoc's files (the docs pages load nothing from a CDN)."""
SEARCH_CAP = 2000
"""Most matches a search collects before paginating (pages beyond it are empty)."""


def create_app(paths: Sequence[str | Path], *, writable: bool = False, token: str | None = None,
               allowed_hosts: Sequence[str] | None = LOOPBACK_HOSTS, cors_origins: Sequence[str] = (),
               device: str = "cpu", dtype: str | None = None, max_waiting: int = 4, cache_mb: float = 512,
               warm_cache: bool = True) -> FastAPI:
    """The service over the dictionaries at `paths`.

    writable: label edits allowed (persisted to features.sqlite). token: when set, every request
    carries it (`Authorization: Bearer TOKEN`, or the cookie the page gets from `?token=`).
    allowed_hosts: Host headers answered (loopback by default: a web page elsewhere cannot reach
    the service through DNS rebinding); None answers any. cors_origins: browser origins allowed to
    call the API from their pages (none by default). max_waiting: requests that may wait for a
    busy model before the next one gets 503. cache_mb: memory for ready feature records (cache.py),
    filled in the background unless warm_cache is False.
    """
    catalog = open_catalog(paths, writable=writable, device=device, dtype=dtype, max_waiting=max_waiting,
                           cache_mb=cache_mb, warm_cache=warm_cache)
    app = FastAPIOffline(static_url=DOCS_ASSETS, title="saeworks feature dictionaries",
                         version=package_version(),
                         description="Browse, search, inspect and steer with SAE feature dictionaries. Field "
                                     "names follow Neuronpedia's where it has the same quantity.")
    app.state.catalog = catalog
    app.state.writable = writable
    _add_security(app, token, allowed_hosts, cors_origins)
    _add_error_handlers(app)
    _add_api(app, catalog, writable)
    _add_page(app, catalog)
    return app


SECURITY_HEADERS = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY",
                    "Referrer-Policy": "no-referrer"}
"""On every response: no MIME sniffing, no framing (label edits cannot be clickjacked), and no
Referer carrying a page URL (or its ?token=) to another site."""


def _add_security(app: FastAPI, token: str | None, allowed_hosts: Sequence[str] | None,
                  cors_origins: Sequence[str]) -> None:
    if token is not None:
        expected = token.encode()

        @app.middleware("http")
        async def require_token(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                                ) -> Response:
            given = request.headers.get("authorization", "")
            given = given[len("Bearer "):] if given.startswith("Bearer ") else ""
            from_query = request.query_params.get("token")
            candidate = given or from_query or request.cookies.get(TOKEN_COOKIE) or ""
            if not hmac.compare_digest(candidate.encode(), expected):
                return JSONResponse({"detail": "this server needs its access token: send 'Authorization: "
                                               "Bearer TOKEN' (or open the page with ?token=TOKEN)"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
            response = await call_next(request)
            if from_query:
                response.set_cookie(TOKEN_COOKIE, token, httponly=True, samesite="strict")
            return response

    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins),
                           allow_methods=["GET", "POST", "PUT"],
                           allow_headers=["Authorization", "Content-Type"])
    if allowed_hosts is not None:
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))

    @app.middleware("http")  # added last, so outermost: the 400s and 401s above carry them too
    async def security_headers(request: Request, call_next: Callable[[Request], Awaitable[Response]]
                               ) -> Response:
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response


def _add_error_handlers(app: FastAPI) -> None:
    def handler(status: int) -> Callable[[Request, Exception], JSONResponse]:
        def respond(request: Request, err: Exception) -> JSONResponse:
            return JSONResponse({"detail": str(err)}, status_code=status)
        return respond

    app.add_exception_handler(SearchSyntaxError, handler(400))
    app.add_exception_handler(FeatureNotFoundError, handler(422))
    app.add_exception_handler(InterventionError, handler(422))
    app.add_exception_handler(GenerationError, handler(422))
    app.add_exception_handler(DictionaryError, handler(422))

    def busy(request: Request, err: Exception) -> JSONResponse:
        retry = getattr(err, "retry_after", 1)
        return JSONResponse({"detail": str(err)}, status_code=503, headers={"Retry-After": str(retry)})

    app.add_exception_handler(QueueFull, busy)


def _served(catalog: dict[str, ServedDictionary], name: str) -> ServedDictionary:
    served = catalog.get(name)
    if served is None:
        raise HTTPException(404, f"no dictionary named {name!r} is served here; served: {', '.join(catalog)}")
    return served


def _check_index(served: ServedDictionary, index: int) -> int:
    if not 0 <= index < served.d_sae:
        raise FeatureNotFoundError(f"feature {index} does not exist: {served.name} has {served.d_sae} "
                                   f"features, ids 0 to {served.d_sae - 1}")
    return index


def _add_api(app: FastAPI, catalog: dict[str, ServedDictionary], writable: bool) -> None:
    @app.get("/api/dictionaries", tags=["dictionaries"])
    def dictionaries() -> dict[str, Any]:
        """The dictionaries served: model, hook, SAE, metrics, size."""
        return {"dictionaries": [{**served.summary(), **served.readiness()} for served in catalog.values()],
                "writable": writable}

    @app.get("/api/{name}/features/{index}", tags=["features"], response_class=Response,
             responses={200: {"content": {"application/json": {}},
                              "description": "the feature record (records.feature_record)"}})
    async def feature(name: str, request: Request, index: int = PathParam(ge=0)) -> Response:
        """Everything the dictionary knows about one feature. Answered on the event loop: a ready
        record is bytes to send (gzip when the client takes it), a new one a few ms of SQLite."""
        served = _served(catalog, name)
        body = served.feature_body(_check_index(served, index))
        if "gzip" in request.headers.get("accept-encoding", ""):
            return Response(body, media_type="application/json",
                            headers={"Content-Encoding": "gzip", "Vary": "Accept-Encoding"})
        return Response(gzip.decompress(body), media_type="application/json",
                        headers={"Vary": "Accept-Encoding"})

    @app.get("/api/{name}/search", tags=["features"])
    def search(name: str, q: str = Query(min_length=1, max_length=500), page: int = Query(1, ge=1),
               per_page: int = Query(20, ge=1, le=MAX_PER_PAGE),
               mode: str = Query("words", pattern="^(words|fts)$")) -> dict[str, Any]:
        """Features whose label, top tokens or context text match `q` (mode=words: every word as a
        prefix; mode=fts: an SQLite FTS5 expression). Label and token matches come first."""
        served = _served(catalog, name)
        ids, context_searched = served.search(q, mode, SEARCH_CAP)
        start = (page - 1) * per_page
        shown = served.handle().summaries(list(ids[start:start + per_page]))
        return {"query": q, "mode": mode, "page": page, "per_page": per_page, "total": len(ids),
                "context_text_searched": context_searched,
                "results": [records.summary_record(s) for s in shown]}

    @app.post("/api/{name}/inspect", tags=["model"])
    def inspect(name: str, request: InspectRequest) -> dict[str, Any]:
        """Which features fire on the text: each token's strongest, and a ranking over the text
        (the maximum over its non-special tokens)."""
        served = _served(catalog, name)
        with served.gate.call():
            encoded = served.model_handle().encode_text(request.text)
        acts = encoded.activations  # [n_tokens, d_sae]
        values, latents = acts.topk(min(request.top, served.d_sae), dim=-1)
        ordinary = [i for i, special in enumerate(encoded.special) if not special]
        ranked: list[tuple[float, int, int]] = []
        if ordinary:
            peak, where = acts[ordinary].max(dim=0)  # [d_sae]
            best = peak.topk(min(request.ranked, served.d_sae))
            ranked = [(float(v), int(j), ordinary[int(where[j])]) for v, j in
                      zip(best.values.tolist(), best.indices.tolist(), strict=True) if v > 0]
        summaries = {s.id: s for s in served.handle().summaries(
            sorted({*latents.flatten().tolist(), *(j for _, j, _ in ranked)}))}
        labels = {j: s.label for j, s in summaries.items()}
        peaks = {j: s.max_activation for j, s in summaries.items()}
        tokens = [{"position": p, "token_id": encoded.token_ids[p], "token": encoded.tokens[p],
                   "special": encoded.special[p],
                   "features": [{"index": j, "activation": v, "label": labels.get(j, ""),
                                 "maxActApprox": peaks.get(j, 0.0)}
                                for v, j in zip(values[p].tolist(), latents[p].tolist(), strict=True)
                                if v > 0]}
                  for p in range(len(encoded.token_ids))]
        return {"text": request.text, "tokens": tokens,
                "ranked": [{"index": j, "label": labels.get(j, ""), "maxValue": v, "maxValueTokenIndex": at,
                            "maxActApprox": peaks.get(j, 0.0), "values": acts[:, j].tolist()}
                           for v, j, at in ranked]}

    @app.post("/api/{name}/activation", tags=["model"])
    def activation(name: str, request: ActivationRequest) -> dict[str, Any]:
        """One feature's activation on every token of the text; maxValue and maxValueTokenIndex
        over its ordinary tokens (special ones such as BOS are attention sinks, as in /inspect)."""
        served = _served(catalog, name)
        index = _check_index(served, request.index)
        with served.gate.call():
            encoded = served.model_handle().encode_text(request.text)
        values = encoded.activations[:, index].tolist()
        ordinary = [p for p, special in enumerate(encoded.special) if not special] or list(range(len(values)))
        peak = max(ordinary, key=values.__getitem__)
        return {"index": index, "tokens": encoded.tokens, "token_ids": encoded.token_ids, "values": values,
                "special": encoded.special, "maxValue": values[peak], "maxValueTokenIndex": peak,
                "minValue": min(values[p] for p in ordinary),
                "maxActApprox": served.handle().summaries([index])[0].max_activation}

    @app.post("/api/{name}/steer", tags=["model"])
    def steer(name: str, request: SteerRequest) -> dict[str, Any]:
        """Default and steered completions with the same seed and settings."""
        served = _served(catalog, name)
        for f in request.features:
            _check_index(served, f.index)
        settings = GenerationSettings(max_new_tokens=request.n_completion_tokens,
                                      temperature=request.temperature, top_p=request.top_p,
                                      frequency_penalty=request.freq_penalty, seed=request.seed,
                                      n_logprobs=request.n_logprobs)
        method = STEER_METHODS[request.steer_method]
        with served.gate.call():
            source = served.feature_source()
            interventions = [FeatureIntervention(source, f.index, method,
                                                 f.strength * request.strength_multiplier, raw=request.raw)
                             for f in request.features]
            model, tokenizer, _ = served.model_handle()._load_runtime()
            results: dict[str, Any] = {}
            for kind in dict.fromkeys(request.types):
                chosen = interventions if kind == "STEERED" else []
                (completion,) = generate(model, tokenizer, request.prompt, chosen, settings,
                                         prepend_bos=source.prepend_bos)
                results[kind] = _completion_record(completion)
        return {"prompt": request.prompt, "steer_method": request.steer_method,
                "features": [f.model_dump() for f in request.features], "settings": asdict(settings),
                **results}

    @app.put("/api/{name}/features/{index}/label", tags=["features"])
    def set_label(name: str, edit: LabelEdit, index: int = PathParam(ge=0)) -> dict[str, Any]:
        """Change a feature's label (only when the service was started with --writable)."""
        served = _served(catalog, name)
        if not writable:
            raise HTTPException(403, "this service is read-only: restart it with --writable to edit labels")
        served.set_label(_check_index(served, index), edit.label)
        (summary,) = served.handle().summaries([index])
        return {"index": index, "label": summary.label, "label_source": summary.label_source}


def _completion_record(completion: Completion) -> dict[str, Any]:
    return {"text": completion.text, "tokens": [t.token for t in completion.logprobs],
            "token_ids": completion.token_ids,
            "logprobs": [{"token": t.token, "token_id": t.token_id, "logprob": t.logprob,
                          "top": [list(alt) for alt in t.top]} for t in completion.logprobs]}


def _add_page(app: FastAPI, catalog: dict[str, ServedDictionary]) -> None:
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    index_html = STATIC_DIR / "index.html"

    def page(name: str | None = None) -> FileResponse:
        """The page; a 404 for a dictionary not served (the page then shows the error itself)."""
        status = 404 if name is not None and name not in catalog else 200
        return FileResponse(index_html, media_type="text/html", status_code=status)

    @app.get("/", include_in_schema=False)
    def home() -> FileResponse:
        return page()

    @app.get("/{name}/features/{index}", include_in_schema=False)
    def feature_page(name: str, index: str) -> FileResponse:
        return page(name)

    @app.get("/{name}/{view}", include_in_schema=False)
    def view_page(name: str, view: str) -> FileResponse:
        if view not in ("search", "inspect", "steer"):
            raise HTTPException(404, f"no page {view!r}; pages: features/ID, search, inspect, steer")
        return page(name)
