"""Attribution, patching, probing and weight editing with SAE features (`saeworks.interp`).

Above `steer` (it reuses its interventions and feature sources), below the application layer:
    readout.py             the final norm (scale frozen from a clean run) and the unembedding
    lens.py                logit lens: every layer's residual stream read out as tokens
    dla.py                 direct logit attribution of features, the SAE error, b_dec and the rest
    patching.py            activation patching on features and hooks; attribution patching
    input_attribution.py   gradient x input and integrated gradients of a feature's activation
    probing.py             difference-of-means and logistic probes; sparse probing on features
    orthogonalize.py       project a direction out of every matrix writing to the residual stream
"""
