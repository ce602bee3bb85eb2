"""seqmix: causal sequence mixers in JAX/Flax behind one interface."""

import setuptools

setuptools.setup(
    name="seqmix",
    version="0.1.0",
    description="Causal sequence mixers (attention, linear attention, SSMs, RNNs) in JAX/Flax.",
    python_requires=">=3.12",
    packages=setuptools.find_packages(include=["seqmix*", "kernels_pallas*", "experiments*"]),
    install_requires=[
        "jax>=0.11",
        "flax>=0.12",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "chex>=0.1.92",
        "grain>=0.2.18",
        "tensorstore>=0.1.86",
        "ml-collections>=1.1",
        "absl-py",
        "jaxtyping",
        "tensorboardX",
        "tqdm",
        "matplotlib",
        "numpy",
        "scipy",
    ],
    extras_require={
        "test": ["pytest>=9", "pytest-xdist", "nbclient", "nbformat", "ipykernel"],
        "bench": ["pandas"],
        # seqmix.convert and its tests (Hugging Face checkpoints in and out).
        "interop": ["torch>=2.14", "transformers>=5.18", "safetensors>=0.8"],
        "gpu": ["jax[cuda13]"],
        "tpu": ["jax[tpu]"],
    },
)
