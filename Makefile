# The README's commands. Each target installs what it needs first (`make install` is fast when
# nothing changed: a stamp file records the installed lock file).
VENV ?= .venv
PYTHON := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DATA_ROOT ?= datasets/synthetic_cityscapes
TINY_CONFIG := configs/Synthetic/upsnet_tiny.yaml
TINY_MODEL := checkpoints/upsnet_tiny_synthetic.pth
SWEEP_CONFIG := configs/Synthetic/upsnet_tiny_robustness.yaml
# The demo's models (shipped weights), their sweeps and a transfer study: the three detectron2
# panoptic models and `transformers`' Mask2Former (panoptic) and SegFormer (semantic, mIoU).
DEMO_CONFIGS := $(SWEEP_CONFIG) configs/Synthetic/panoptic_fpn_tiny_robustness.yaml \
	configs/Synthetic/panoptic_deeplab_tiny_robustness.yaml \
	configs/Synthetic/mask2former_tiny_robustness.yaml \
	configs/Synthetic/segformer_tiny_robustness.yaml
DEMO_RUNS := output/upsnet_tiny_robustness output/panoptic_fpn_tiny_robustness \
	output/panoptic_deeplab_tiny_robustness output/mask2former_tiny_robustness \
	output/segformer_tiny_robustness
DEMO_IMAGES ?= 12
# Written after the data set is generated: a data set from an older generator (without the
# polygon files of the semantic and instance splits) is regenerated.
DATA_STAMP := $(DATA_ROOT)/.complete-v2

.PHONY: install demo test test-quick bench clean-demo

install: $(STAMP)

$(STAMP): requirements/lock.txt requirements/no-deps.txt setup.py tools/install_env.sh
	VENV=$(VENV) bash tools/install_env.sh
	touch $@

$(DATA_STAMP): | $(STAMP)
	$(PYTHON) tools/prepare_synthetic_cityscapes.py --output $(DATA_ROOT)
	touch $@

# The tiny model is shipped; if it is missing it is trained (about 5-10 min on 2 CPU cores) and
# stripped to its weights.
$(TINY_MODEL): | $(DATA_STAMP)
	$(PYTHON) tools/train_net.py --config-file $(TINY_CONFIG) OUTPUT_DIR output/upsnet_tiny
	$(PYTHON) tools/export_weights.py output/upsnet_tiny/model_final.pth $@

# The main job on the embedded default: data (if absent), then the study's protocol on the
# shipped models (UPSNet, PanopticFPN, Panoptic-DeepLab, Mask2Former, SegFormer; undefended and
# NL-means) on DEMO_IMAGES val images, their transfer heatmap, and the models side by side.
demo: $(STAMP) $(TINY_MODEL) | $(DATA_STAMP)
	@for c in $(DEMO_CONFIGS); do \
		$(PYTHON) tools/attack_net.py --config-file $$c ROBUSTNESS.MAX_IMAGES $(DEMO_IMAGES) || exit 1; \
	done
	$(PYTHON) tools/transfer_net.py $(foreach c,$(DEMO_CONFIGS),--config-file $(c)) \
		--output-dir output/demo_transfer ROBUSTNESS.ATTACKS "['ifgsm']" \
		ROBUSTNESS.EPSILONS "[4.0, 16.0]" ROBUSTNESS.DEFENSES "['none']" \
		ROBUSTNESS.MAX_IMAGES $(DEMO_IMAGES)
	$(PYTHON) tools/compare_runs.py --output-dir output/demo $(DEMO_RUNS)
	@echo "Reports: output/demo/comparison.{md,png}, output/demo_transfer/transfer.{md,png},"
	@echo "         and per model robustness.md (plots, examples/ beside it) in $(DEMO_RUNS)"

test: $(STAMP)
	$(PYTHON) -m pytest tests -q

# Leaves out the tests marked slow (pytest.ini): subprocess runs and trained-model sweeps.
test-quick: $(STAMP)
	$(PYTHON) -m pytest tests -q -m "not slow"

bench: $(STAMP)
	$(PYTHON) benchmarks/run_all.py

clean-demo:
	rm -rf $(DATA_ROOT) output/upsnet_tiny $(DEMO_RUNS) output/demo_transfer output/demo
