# The README's commands. Each target installs what it needs first (`make install` is fast when
# nothing changed: a stamp file records the installed lock file).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_ROOT ?= datasets/synthetic_cityscapes
TINY_CONFIG := configs/Synthetic/upsnet_tiny.yaml
TINY_MODEL := checkpoints/upsnet_tiny_synthetic.pth
SWEEP_CONFIG := configs/Synthetic/upsnet_tiny_robustness.yaml

.PHONY: install demo test test-quick bench clean-demo

install: $(STAMP)

$(STAMP): requirements/lock.txt setup.py tools/install_env.sh
	VENV=$(VENV) bash tools/install_env.sh
	touch $@

$(DATA_ROOT)/gtFine/cityscapes_panoptic_val.json: | $(STAMP)
	$(PYTHON) tools/prepare_synthetic_cityscapes.py --output $(DATA_ROOT)

# The tiny model is shipped; if it is missing it is trained (about 5-10 min on 2 CPU cores) and
# stripped to its weights.
$(TINY_MODEL): | $(DATA_ROOT)/gtFine/cityscapes_panoptic_val.json
	$(PYTHON) tools/train_net.py --config-file $(TINY_CONFIG) OUTPUT_DIR output/upsnet_tiny
	$(PYTHON) tools/export_weights.py output/upsnet_tiny/model_final.pth $@

# The main job on the embedded default: data (if absent), the tiny model (trained if absent),
# then the robustness sweep; prints the table and where the report is.
demo: $(STAMP) $(TINY_MODEL) | $(DATA_ROOT)/gtFine/cityscapes_panoptic_val.json
	$(PYTHON) tools/attack_net.py --config-file $(SWEEP_CONFIG)
	@echo "Report: output/upsnet_tiny_robustness/robustness.md (plots, examples/ beside it)"

test: $(STAMP)
	$(PYTHON) -m pytest tests -q

# Leaves out the tests marked slow (pytest.ini): subprocess runs and trained-model sweeps.
test-quick: $(STAMP)
	$(PYTHON) -m pytest tests -q -m "not slow"

bench: $(STAMP)
	$(PYTHON) benchmarks/run_all.py

clean-demo:
	rm -rf $(DATA_ROOT) output/upsnet_tiny output/upsnet_tiny_robustness
