"""Entry point: python train.py [-m] method=... dataset=... model=... cluster=... logger=..."""

import hydra

import peft_lab.config  # noqa: F401  (registers the typed schemas before composition)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg):
    from peft_lab.run import main as run_cell

    return run_cell(cfg)


if __name__ == "__main__":
    main()
