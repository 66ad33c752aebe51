"""Exposure-bias diagnostic of a window (spatial-AR) checkpoint: free generation vs teacher-forced scoring.

On the checkpoint's test section (use an INNER validation section -- a training section of the outer fold --
never the outer held-out one when the answer chooses anything), every spot gets K samples from its owner
cover window in two ways, with the same engine, settings and seed:

* ``generated`` -- the normal prediction: spot by spot, each spot conditioned on the window's H&E and on the
  codes *sampled* for the spots before it (what ``armodal-eval`` reports);
* ``teacher_forced`` -- each spot conditioned on the window's H&E and on the *measured* codes of the spots
  before it (the training condition), then its own codes sampled.

The point prediction is the mean of the K samples decoded without the quantiser residual, as in
``armodal-eval``.  A large gap (teacher-forced >> generated) says the model leans on its neighbours' codes and
its own samples mislead it (exposure bias); no gap says the neighbours are not the problem.  Prints JSON.

    python scripts/spatial_exposure.py runs/.../checkpoints/last.ckpt --num-samples 32 [--temperature 1.0]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np
import torch

from armodal import api
from armodal.generation import GenerationConfig, generate, seeded_generator
from armodal.modalities.spatial.geometry import cover, spot_spacing
from armodal.modalities.spatial.predict import pearson_per_gene, predict_expression, sequence_layout
from armodal.modalities.spatial.sampler import _datamodule, section_features
from armodal.modalities.spatial.window import window_cond, window_layout, window_tokens


@torch.no_grad()
def teacher_forced_codes(model, feats: torch.Tensor, pos: np.ndarray, true_ids: torch.Tensor, num_samples: int,
                         size: int, order: str, config: GenerationConfig, spot_key: str = "none") -> torch.Tensor:
    """[n, K, Q] ids: each spot sampled from its owner window with the measured ids of the spots before it."""
    tok, net, cond = model.tokenizer, model.net, model.conditioner
    net.eval()
    cond.eval()
    q = tok.n_levels
    cov = cover(pos, size)
    lay = [window_layout(pos, w, order) for w in cov.windows]
    spots = np.stack([s for s, _ in lay])  # [W, n_w]
    offs = np.stack([o for _, o in lay])
    prefix = cond(window_cond(feats[torch.as_tensor(spots)].float(), offs, tok, spot_key))
    ids_all, types_all = window_tokens(true_ids[torch.as_tensor(spots)], offs, tok, spot_key)  # [W, n_w * (Q + 1)]
    g = seeded_generator(config, model.device)
    out = torch.zeros((len(pos), num_samples, q), dtype=torch.long)
    filled = torch.zeros(len(pos), dtype=torch.long)
    for i in range(spots.shape[1]):  # the spot at position i of every window that owns it
        rows = np.nonzero(cov.owner[spots[:, i]] == np.arange(len(spots)))[0]
        if not len(rows):
            continue
        r = torch.as_tensor(rows)
        prompt = ids_all[r, : i * (q + 1) + 1]  # measured spots 0..i-1, then spot i's marker
        types = types_all[r].repeat_interleave(num_samples, 0)

        def typed(seq, types=types):
            return types[:, : seq.shape[1]] if seq.shape[0] == types.shape[0] else types[:: num_samples][:, : seq.shape[1]]

        rules = dataclasses.replace(model.token_rules(config), types_fn=typed)
        res = generate(net, prompt, config.replace(max_new_tokens=q), prefix=prefix[r], tokens=rules, generator=g,
                       num_return_sequences=num_samples)
        new = res.ids[:, -q:].reshape(len(rows), num_samples, q)
        js = torch.as_tensor(spots[rows, i])
        out[js] = new
        filled[js] += 1
    if not bool((filled == 1).all()):
        raise RuntimeError("teacher-forced cover did not score every spot exactly once")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("ckpt")
    ap.add_argument("--num-samples", type=int, default=32)
    ap.add_argument("--temperature", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    model = api.load(args.ckpt)
    layout = sequence_layout(model.config.modality.data)
    if layout["sequence"] != "window":
        raise SystemExit(f"{args.ckpt}: a {layout['sequence']!r} model; the diagnostic needs window sequences")
    dm, s = _datamodule(model.config.modality.data, None)
    feats = section_features(model, dm, s)
    xy = np.asarray(dm.adatas[s].obsm["spatial"], np.float64)
    y = dm.expr[s]
    config = GenerationConfig(seed=args.seed, temperature=args.temperature)
    tok = model.tokenizer
    out = {"ckpt": args.ckpt, "section": s, "num_samples": args.num_samples, "temperature": args.temperature}
    t0 = time.time()
    _, mean_gen, _ = predict_expression(model, feats, xy, args.num_samples, layout, config, noise=False)
    out["generated_pcc"] = float(np.nanmean(pearson_per_gene(mean_gen, y)))
    t1 = time.time()
    codes = teacher_forced_codes(model, feats, xy / spot_spacing(xy), dm.codes[s].view(len(y), -1), args.num_samples,
                                 int(layout["window_size"]), layout["order"], config, layout["spot_key"])
    n, k, q = codes.shape
    tf = tok.decode_codes((codes.reshape(-1, q) - 1).numpy(), noise=False).reshape(n, k, -1)
    out["teacher_forced_pcc"] = float(np.nanmean(pearson_per_gene(tf.mean(1), y)))
    # the ceiling: the measured codes themselves, decoded (what the tokenizer can express)
    meas = tok.decode_codes((dm.codes[s].view(len(y), -1) - 1).numpy(), noise=False).reshape(n, -1)
    out["measured_codes_pcc"] = float(np.nanmean(pearson_per_gene(meas, y)))
    out["seconds"] = {"generated": round(t1 - t0, 1), "teacher_forced": round(time.time() - t1, 1)}
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
