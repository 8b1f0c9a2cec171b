"""rest-jax: Reinforced Self-Training (ReST, ReST-EM) of language models in JAX."""
import pathlib

import setuptools

_HERE = pathlib.Path(__file__).parent


def _requirements(name):
  lines = (_HERE / name).read_text().splitlines()
  return [l.split('#')[0].strip() for l in lines if l.split('#')[0].strip()]


setuptools.setup(
    name='rest-jax',
    version='0.1.0',
    description='Reinforced Self-Training (ReST, ReST-EM) for language models in JAX.',
    long_description=(_HERE / 'README.md').read_text(),
    long_description_content_type='text/markdown',
    license='Apache-2.0',
    python_requires='>=3.11,<3.12',
    packages=setuptools.find_packages(include=['rest_jax', 'rest_jax.*', 'tasks', 'tasks.*']),
    package_data={'tasks': ['data/**/*'], '': ['*.gin']},
    include_package_data=True,
    install_requires=_requirements('requirements.txt'),
    extras_require={
        # Peers the benchmarks compare against (issue: side-by-side throughput).
        'bench': ['torch==2.13.0', 'transformers==5.23.0', 'ctranslate2==4.8.5', 'sacremoses==0.2.0'],
        # Cloud launches (xm_launch/) have their own environment: xmanager needs protobuf<7,
        # this stack pins 7.x (`bash xm_launch/env.sh` builds xm_launch/.venv).
    },
    entry_points={'console_scripts': ['rest-jax=rest_jax.main:main']},
)
