# Shortcuts for ./dev, the project's entry point (README): `make run`, `make test`.

.PHONY: run test deps clean

run:
	./dev run $(if $(CONFIG),--config $(CONFIG))

test:
	./dev test

deps:
	sh .ci/debian-packages

clean:
	rm -rf .venv _trial_temp* build *.egg-info
