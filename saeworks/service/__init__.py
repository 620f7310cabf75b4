"""The feature-dictionary service: `saeworks serve DICT_DIR [DICT_DIR ...]`.

One process serves JSON endpoints and a web page (static assets shipped in `static/`, no CDN) over
one or more feature dictionaries. Each dictionary is addressed by its served name (its directory's
name, made unique), never by a path. Field names follow Neuronpedia's where it has the same thing
(records.py holds the mapping).

    GET  /api/dictionaries                      the dictionaries served (model, hook, SAE, metrics, size)
    GET  /api/{name}/features/{index}           one feature: density, histogram, contexts, logit
                                                effects, neighbours, label
    GET  /api/{name}/search?q=&page=&per_page=&mode=words|fts
                                                features by label, top tokens and context text
    POST /api/{name}/inspect    {text, top}     which features fire on the text: per token, and
                                                ranked over the text (search via inference)
    POST /api/{name}/activation {text, index}   one feature's activation on each token of a text
    POST /api/{name}/steer      {prompt, features[{index, strength}], steer_method, types,
                                 n_completion_tokens, temperature, seed, n_logprobs, ...}
                                                default and steered completions side by side
    PUT  /api/{name}/features/{index}/label {label}   only with --writable; "" restores the auto label
    GET  /openapi.json, /docs                   the schema and interactive docs
    GET  /, /{name}/features/{index}, /{name}/search, /{name}/inspect, /{name}/steer   the page

Model-backed endpoints (inspect, activation, steer) run one model call at a time per model, with
a bounded queue; a full queue answers 503 with Retry-After. Inputs are validated (422 with a
message); a malformed full-text query is a 400.
"""
