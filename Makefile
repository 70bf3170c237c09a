# The README's commands. Each target installs what it needs first (`make install` is fast when
# nothing changed: a stamp file records the installed lock file).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_ROOT ?= datasets/synthetic_cityscapes
TINY_CONFIG := configs/Synthetic/upsnet_tiny.yaml
TINY_MODEL := output/upsnet_tiny/model_final.pth

.PHONY: install demo test bench clean-demo

install: $(STAMP)

$(STAMP): requirements/lock.txt setup.py tools/install_env.sh
	VENV=$(VENV) bash tools/install_env.sh
	touch $@

$(DATA_ROOT)/gtFine/cityscapes_panoptic_val.json: | $(STAMP)
	$(PYTHON) tools/prepare_synthetic_cityscapes.py --output $(DATA_ROOT)

$(TINY_MODEL): | $(DATA_ROOT)/gtFine/cityscapes_panoptic_val.json
	$(PYTHON) tools/train_net.py --config-file $(TINY_CONFIG)

# The main job on the embedded default: data (if absent), the tiny model (trained if absent),
# then its evaluation.
demo: $(STAMP) $(TINY_MODEL)
	$(PYTHON) tools/train_net.py --config-file $(TINY_CONFIG) --eval-only MODEL.WEIGHTS $(TINY_MODEL)

test: $(STAMP)
	$(PYTHON) -m pytest tests -q

clean-demo:
	rm -rf $(DATA_ROOT) output/upsnet_tiny
