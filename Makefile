# snapchain.vmbackup — every target a newcomer or CI needs.
#   make test   install (if needed), sanity, lint, unit and integration tests against the lab
#   make demo   full backup/restore demo on a throwaway local lab
#   make bench  performance figures on a throwaway lab cluster, then the 2 GiB vs 8 GiB scale figures,
#               then the digest-scan (raw file) figures
#   (with $CI set, a skipped test fails unit/integration unless tests/allowed_skips.txt justifies it)
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
LAB := /usr/bin/python3 tests/lab/snaplab.py
# Outside the work tree: inside it, ansible-test would ask git and see only ignored files.
# ansible-test gets its own venv: its pinned tools must not disturb .venv.
SANITY_VENV := build/sanity-venv
SANITY_BASE := /tmp/snapchain-sanity-$(shell echo $(CURDIR) | md5sum | cut -c1-8)
SANITY_ROOT := $(SANITY_BASE)/ansible_collections/snapchain/vmbackup
export ANSIBLE_COLLECTIONS_PATH := $(CURDIR)/build/collections
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: test install link sanity lint unit integration demo bench lab-start lab-stop build clean

test: install link sanity lint unit integration

install:
	$(LAB) install

link:
	@mkdir -p build/collections/ansible_collections/snapchain
	@ln -sfn $(CURDIR) build/collections/ansible_collections/snapchain/vmbackup

# ansible-test needs the collection at ansible_collections/<ns>/<name> as a real tree.
sanity: $(SANITY_VENV)/bin/ansible-test
	mkdir -p $(HOME)/.ansible/test/cache
	for v in 24_2 25_0 25_1 25_2 25_3; do cp tests/sanity/get_pip.py $(HOME)/.ansible/test/cache/get_pip_$$v.py; done
	rm -rf $(SANITY_BASE) && mkdir -p $(SANITY_ROOT)
	git ls-files -z --cached --others --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -C $(SANITY_ROOT) -xf -
	cd $(SANITY_ROOT) && $(CURDIR)/$(SANITY_VENV)/bin/ansible-test sanity --venv --python 3.11 --color no

$(SANITY_VENV)/bin/ansible-test: tests/requirements.txt
	/usr/bin/python3 -m venv $(SANITY_VENV)
	$(SANITY_VENV)/bin/pip install -q "$$(grep '^ansible-core' tests/requirements.txt)"

lint: link
	ansible-lint

unit: link
	$(PY) -m pytest tests/unit -q -p no:cacheprovider -rs

integration: link
	$(PY) -m pytest tests/integration -q -p no:cacheprovider -rs

bench: install link
	$(PY) tests/bench/bench.py
	$(PY) tests/bench/bench_prune.py
	$(PY) tests/bench/scale.py
	$(PY) tests/bench/bench_digest_scan.py

demo: install link
	$(PY) tests/demo/demo.py

lab-start:
	$(LAB) start

lab-stop:
	$(LAB) stop

build:
	ansible-galaxy collection build --force --output-path build/

clean:
	rm -rf build tests/output
