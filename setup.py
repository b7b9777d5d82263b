"""sajax: Stable Alignment in JAX — the SANDBOX simulator (`sim`) and the sharded Flax LLaMA trainer (`sajax`)."""

from setuptools import setup

RUNTIME = [
    "jax==0.10.2", "jaxlib==0.10.2", "flax==0.12.8", "optax==0.2.8", "orbax-checkpoint==0.12.8",
    "transformers==5.23.0", "tokenizers==0.23.3", "sentencepiece==0.2.3", "safetensors==0.8.0",
    "ml_collections==1.1.0", "tensorflow-datasets==4.9.10", "array-record==0.8.6", "grain==0.2.18",
    "scann==1.4.2", "numpy==2.4.6", "protobuf==7.36.2", "tqdm==4.70.1",
    "importlib_resources==7.1.0",  # TFDS needs it at run time but does not declare it on Python >= 3.11
    "jinja2==3.1.6",  # transformers chat templates
    "ml_dtypes==0.6.0",  # bfloat16 for numpy (safetensors I/O); the version jax 0.10.2 installs
    "scipy==1.17.1",  # softmax of the rating readouts; the version jax 0.10.2 installs
    "absl-py==2.5.1",  # CLI flags; the version ml_collections installs
    "tensorboardX==2.6.5",  # TensorBoard event files without TensorFlow
    "matplotlib==3.11.2",  # the simulator's metrics plot
    "pyarrow==26.0.1",  # Parquet preference files (TRL / the HF hub); the version tensorflow-datasets installs
    "gguf==0.19.0",  # llama.cpp GGUF files: metadata and dequantization in numpy
    "openai==3.54.0",  # OpenAI-compatible servers (served judges)
    "fastapi==0.165.0", "uvicorn==0.54.0",  # sajax-serve: the OpenAI-compatible HTTP server
]
TEST = ["pytest==9.2.0", "pytest-xdist==3.8.0",  # two test workers (pytest.ini)
        "torch==2.13.0",  # torch: the transformers reference models in tests only
        "peft==0.21.2",  # loads sajax's LoRA adapters onto the transformers base (the PEFT format's reference)
        "accelerate==1.15.0",  # transformers' own GGUF loading (the reference for sajax's) needs it
        "pandas==3.1.1"]  # pandas: writes test files exactly as the original Stable Alignment project does

# sajax-compile: XLA's TPU compiler (the version jax[tpu]==0.10.2 pins; wheels for Linux), no TPU needed
TPU = ["libtpu==0.0.42.*; platform_system == 'Linux'"]

setup(
    name="sajax",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    packages=["sajax", "sajax.configs", "sajax.parallel", "sajax.model", "sajax.formats", "sajax.data", "sajax.train",
              "sajax.infer", "sajax.evals", "sim"],
    package_dir={"sajax.configs": "configs"},
    package_data={"sajax": ["assets/*.txt", "assets/*.json"], "sim": ["assets/*.txt", "assets/*.jsonl"]},
    install_requires=RUNTIME,
    extras_require={"test": TEST + TPU, "tpu": TPU},  # the tests compile for a TPU slice too
    entry_points={"console_scripts": [
        "sajax-train=sajax.cli:train_main",
        "sajax-export=sajax.cli:export_main",
        "sajax-generate=sajax.cli:generate_main",
        "sajax-eval=sajax.cli:eval_main",
        "sajax-serve=sajax.cli:serve_main",
        "sajax-compile=sajax.cli:compile_main",
        "sajax-sim=sim.cli:sim_main",
        "sajax-sim-dataset=sim.cli:dataset_main",
        "sajax-calibrate=sim.cli:calibrate_main",
        "sajax-pipeline=sim.cli:pipeline_main",
    ]},
)
