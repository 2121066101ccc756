"""Sentence-embedding throughput: kexue_jax.hf.embed (JAX, fp32) vs sentence-transformers (torch CPU).

all-MiniLM-L6-v2, batch 64, every text truncated to exactly 128 tokens (so both pad to 128), the same
CPU set for both (this process pins itself with sched_setaffinity; the torch child inherits it and calls
torch.set_num_threads(threads)). Timed: tokenization + forward + pooling + normalisation of all texts,
after one warm-up call (compilation); the median of ``--repeats``. The torch side runs in another Python
(``--torch-python``, default /tmp/stvenv/bin/python: a venv with torch and sentence-transformers, see
tests/fixtures/make_minilm_fixture.py); if it is missing the JSON says so and gives only our figure.
JAX is measured before and after the torch run (the machine is shared) and the median of both is used.

    python benchmarks/embed_throughput.py [--texts 512] [--repeats 5] [--threads 2]

Last line: one JSON object {"kexue_jax": sentences/s, "sentence_transformers": sentences/s, "ratio": ...}.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "government company number group problem fact be have do say get make go know take see come think "
         "look want give use find tell ask seem feel try leave call good new first last long great little own "
         "other old right big high different small large next early young important few public bad same able "
         "king queen crown sword night love death heaven earth blood honour grace fortune father mother brother "
         "lord lady sweet fair gentle noble true false heart soul mind tongue word speak hear").split()

TORCH_SIDE = r"""
import json, sys, time, statistics
import torch
from sentence_transformers import SentenceTransformer
texts_file, model_dir, threads, repeats, batch = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
texts = json.load(open(texts_file))
model = SentenceTransformer(model_dir, device="cpu")
model.max_seq_length = 128
run = lambda: model.encode(texts, batch_size=batch, convert_to_numpy=True, normalize_embeddings=False)
emb = run()
times = []
for _ in range(repeats):
    t = time.perf_counter(); run(); times.append(time.perf_counter() - t)
import sentence_transformers
print(json.dumps({"seconds": times, "torch": torch.__version__, "threads": torch.get_num_threads(),
                  "sentence_transformers": sentence_transformers.__version__, "embeddings": emb[:8].tolist()}))
"""


def make_texts(n: int, seed: int = 0) -> list[str]:
    """n pseudo-sentences of 150 common words (> 128 word pieces each, so all are truncated to 128)."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, 150)) + "." for _ in range(n)]


def time_jax(texts, cfg, params, tokenizer, repeats, batch):
    from kexue_jax import hf

    hf.embed(texts, model=(cfg, params), tokenizer=tokenizer, batch_size=batch, max_length=128)  # compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = hf.embed(texts, model=(cfg, params), tokenizer=tokenizer, batch_size=batch, max_length=128)
        times.append(time.perf_counter() - start)
    return times, out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument("--torch-python", default="/tmp/stvenv/bin/python")
    args = parser.parse_args()
    cpus = sorted(os.sched_getaffinity(0))[:args.threads]
    os.sched_setaffinity(0, cpus)  # before jax starts its thread pool; the torch child inherits it

    from kexue_jax import hf  # noqa: E402 (after pinning)

    model_dir = hf.minilm_path()
    cfg, params = hf.load_bert(model_dir)
    tokenizer = hf.load_tokenizer(model_dir)
    texts = make_texts(args.texts)
    lengths = {len(ids) for ids, _ in hf.encode_texts(tokenizer, texts, 128)}
    assert lengths == {128}, lengths

    jax_times, ours = time_jax(texts, cfg, params, tokenizer, args.repeats, args.batch_size)
    result = {"model": "all-MiniLM-L6-v2", "texts": args.texts, "batch_size": args.batch_size, "length": 128,
              "dtype": "float32", "cpus": cpus, "threads": args.threads, "repeats": args.repeats}
    torch_info = None
    if os.path.exists(args.torch_python):
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(texts, f)
        try:
            proc = subprocess.run([args.torch_python, "-c", TORCH_SIDE, f.name, str(model_dir), str(args.threads),
                                   str(args.repeats), str(args.batch_size)], capture_output=True, text=True,
                                  timeout=1800)
        finally:
            os.unlink(f.name)
        if proc.returncode == 0:
            torch_info = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            result["torch_error"] = proc.stderr.strip().splitlines()[-1:]
    else:
        result["torch_notice"] = (f"{args.torch_python} not found: sentence-transformers side skipped (make the "
                                  f"venv as in tests/fixtures/make_minilm_fixture.py)")
    jax_times += time_jax(texts, cfg, params, tokenizer, args.repeats, args.batch_size)[0]
    ours_rate = args.texts / statistics.median(jax_times)
    result["kexue_jax"] = round(ours_rate, 1)
    result["kexue_jax_seconds"] = [round(t, 3) for t in jax_times]
    if torch_info is not None:
        st_rate = args.texts / statistics.median(torch_info["seconds"])
        result.update({"sentence_transformers": round(st_rate, 1), "ratio": round(ours_rate / st_rate, 3),
                       "sentence_transformers_seconds": [round(t, 3) for t in torch_info["seconds"]],
                       "torch": torch_info["torch"], "torch_threads": torch_info["threads"],
                       "max_abs_diff_first8": float(np.max(np.abs(np.asarray(torch_info["embeddings"]) - ours[:8])))})
    else:
        result.update({"sentence_transformers": None, "ratio": None})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
