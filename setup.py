"""Install EE-Megatron: `pip install torch==2.13.0 -e ".[test]"` (pin torch yourself on CPU machines).

The indexed-dataset sample-index builder is compiled from C++ with pybind11 when a compiler is there;
`megatron.data` falls back to an identical numpy implementation when the extension is missing.
"""

import os

from setuptools import find_packages, setup

# Literal lists: tools/install_missing.py reads them (without running this file) to see what is missing.
REQUIRES = ["torch>=2.3", "numpy", "sentencepiece", "regex", "pybind11"]
EXTRAS = {
    "test": [
        "pytest", "pytest-timeout", "transformers", "safetensors", "tokenizers", "matplotlib", "gguf",
        "selenium", "accelerate", "tensorboard",
    ],
    "gguf": ["gguf"],
    "viz": ["matplotlib"],
    "gpu": ["flash-attn", "transformer-engine"],
}

ext_modules = []
cmdclass = {}
_helpers = os.path.join("megatron", "data", "helpers.cpp")
if os.path.exists(_helpers):
    try:
        from pybind11.setup_helpers import Pybind11Extension, build_ext

        class _OptionalBuildExt(build_ext):
            """Never fail the install over the optional extension: the numpy fallback gives the same result."""

            def run(self):
                try:
                    super().run()
                except Exception as exc:  # noqa: BLE001 - report and continue without the extension
                    print(f"warning: C++ dataset helpers not built ({exc}); using the numpy fallback")

            def build_extension(self, ext):
                try:
                    super().build_extension(ext)
                except Exception as exc:  # noqa: BLE001
                    print(f"warning: {ext.name} not built ({exc}); using the numpy fallback")

        ext_modules.append(Pybind11Extension("megatron.data._helpers", [_helpers], cxx_std=17))
        cmdclass["build_ext"] = _OptionalBuildExt
    except ImportError:
        pass

setup(
    name="ee-megatron",
    version="0.1.0",
    description="Early-exit LLM training and inference with tensor, pipeline and data parallelism",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["megatron", "megatron.*", "tools", "tools.*"]),
    include_package_data=True,
    package_data={"megatron": ["**/*.html", "**/*.js", "**/*.css", "data/*.cpp"]},
    install_requires=REQUIRES,
    extras_require=EXTRAS,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
