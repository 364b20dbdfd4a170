from setuptools import find_packages, setup

setup(
    name="nnsynth",
    version="0.1.0",
    description="Self-configuring multi-sequence MRI synthesis in the style of nnU-Net",
    packages=find_packages(include=["nnsynth", "nnsynth.*"]),
    package_data={"nnsynth": ["dataset/demo/assets/*"]},
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.1",
        "numpy>=1.24",
        "SimpleITK>=2.2",
        "batchgenerators>=0.25",
        "batchgeneratorsv2>=0.2",
        "acvl-utils>=0.2",
        "scikit-image>=0.21",
        "lpips>=0.1.4",
        "pandas>=2.0",
        "dynamic-network-architectures>=0.3",
        "blosc2>=2.5",
        "matplotlib>=3.7",
        "tqdm>=4.60",
        "scipy>=1.10",
    ],
    extras_require={"test": ["pytest>=7", "hypothesis>=6"]},
    entry_points={
        "console_scripts": [
            "nnsynth_make_demo_dataset=nnsynth.cli.make_demo:cli",
            "nnsynth_verify_dataset=nnsynth.cli.verify:cli",
            "nnsynth_convert_brats=nnsynth.cli.convert_brats:cli",
            "nnsynth_plan_and_preprocess=nnsynth.cli.plan_and_preprocess:cli",
            "nnsynth_train=nnsynth.cli.train:cli",
            "nnsynth_predict=nnsynth.cli.predict:cli",
            "nnsynth_evaluate=nnsynth.cli.evaluate:cli",
            "nnsynth_analyze=nnsynth.cli.analyze:cli",
        ],
    },
)
