"""Load-test any OpenAI-compatible endpoint, vLLM `bench serve` style (the code lives in
qwenvl_pd/loadgen so that `qwenvl-pd bench` is the same tool).

    .venv/bin/qwenvl-pd serve --port 8000 &
    .venv/bin/python benchmarks/serve.py --port 8000 --dataset-name random --random-input 200 \
        --num-prompts 200 --request-rate 1 --save-result --result-dir ./
    .venv/bin/python benchmarks/serve.py --port 8000 --dataset-name random-mm \
        --random-mm-image-size 448x448 --num-prompts 50 --max-concurrency 4 --goodput ttft:500 tpot:50
"""
import sys

from qwenvl_pd.loadgen.serve import main

if __name__ == "__main__":
    sys.exit(main())
