"""Train a CoReDi / ReDi / SiT diffusion transformer.

    python train.py                                                    # the embedded demo: digits, CPU, < 10 min
    python train.py --config configs/demo_digits.yaml run.steps=500    # any field: section.key=value
    torchrun --nproc_per_node 8 train.py --config configs/imagenet256_coredi_xl.yaml data.path=/data/in256
    deepspeed train.py --ds_config ds_zero2.json --config configs/imagenet256_coredi_xl.yaml data.path=/data/in256

Configuration: defaults (= the demo) <- --config file (YAML/JSON) <- overrides; validated before anything runs.
"""
import argparse
import sys


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="YAML or JSON file with sections data/model/encoder/vae/method/optim/"
                                         "sample/run (missing fields keep their defaults)")
    parser.add_argument("--ds_config", "--deepspeed_config", dest="ds_config",
                        help="DeepSpeed json (e.g. ds_zero2.json): train with DeepSpeed ZeRO")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; torchrun uses LOCAL_RANK instead")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("overrides", nargs="*", metavar="section.key=value",
                        help="override any config field, e.g. optim.lr=2e-4 run.out_dir=runs/x")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    from coredi_fast.training.config import load_config

    from coredi_fast.training.preflight import preflight

    try:
        cfg = load_config(args.config, args.overrides)
        if args.print_config:
            import yaml

            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            return
        preflight(cfg, args.ds_config)  # files, packages and parts together: still before anything is written
    except (ValueError, FileNotFoundError, TypeError) as e:
        print(f"train.py: config error: {e}", file=sys.stderr)
        sys.exit(2)
    from coredi_fast.training.loop import NonFiniteLossError, run
    from coredi_fast.training.run_folder import RunSetupError
    from coredi_fast.training.stop_signals import TrainingStopped

    try:
        run(cfg, ds_config_path=args.ds_config, local_rank=args.local_rank)
    except RunSetupError as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(2)
    except TrainingStopped as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(e.exit_status)
    except NonFiniteLossError as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
