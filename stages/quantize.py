"""quantize: one weight-only quantized copy of quantize.source per method in quantize.methods (lm/quant.py).

Writes one model directory per method (packed weights in model.safetensors). Metrics, per method: file bytes
before and after, in-memory weight bytes, and the relative error of the quantized model's logits on calibration
windows.
"""

import logging
from pathlib import Path

from lm import calibrate, io, model_dir, quant
from lm.tokens import load_tokens
from stages import cli
from stages.config import Params
from stages.tracking import Tracker, git_commit

log = logging.getLogger("stages.quantize")


def run(params: Params, tracker: Tracker) -> dict:
    cfg, paths = params.quantize, params.paths
    source = params.models()[cfg.source]
    reference = model_dir.load(source)
    batches = calibrate.calibration_batches(
        load_tokens(paths.tokens, "train"), reference.config.block_size, cfg.calibration_samples
    )
    results = {}
    with io.atomic_dir(paths.model("quantize")) as out:
        for method in cfg.methods:
            model = model_dir.load(source)
            if method == "int8":
                quantization = {"method": "int8"}
                quant.quantize_int8(model)
            else:
                quantization = {"method": method, "bits": 4, "group_size": cfg.group_size}
                calibration = batches if method == "int4_gptq" else None
                quant.quantize_int4(model, calibration, cfg.group_size, cfg.damp, cfg.act_order)
            card = {
                "name": f"quantize_{method}",
                "description": f"{method} weight-only quantization of {cfg.source}.",
                "source": source,
                "git_commit": git_commit(),
            }
            model_dir.save(model, out / method, Path(source) / model_dir.TOKENIZER, card, quantization)
            saved = model_dir.load(out / method)
            before, after = model_dir.file_bytes(source), model_dir.file_bytes(out / method)
            results[method] = {
                "source_bytes": before,
                "file_bytes": after,
                "size_ratio": after / before,
                "weight_bytes": quant.weight_bytes(saved),
                "logit_error": quant.logit_error(saved, reference, batches[:2]),
            }
            log.info("quantize %s: %s", method, {k: round(v, 4) for k, v in results[method].items()})
    return results


if __name__ == "__main__":
    cli.main(run)
