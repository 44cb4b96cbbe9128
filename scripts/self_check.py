"""Import the pinned stack and run one fbgemm operator; explain a failure in one sentence."""

import sys


def main() -> int:
    try:
        import torch
    except Exception as e:  # noqa: BLE001 - any failure here is reported in one sentence
        print(f"self-check failed: torch does not import ({e}); rerun `make setup`.")
        return 1
    try:
        import fbgemm_gpu  # noqa: F401 - registers torch.ops.fbgemm
    except Exception as e:  # noqa: BLE001
        print(
            f"self-check failed: fbgemm_gpu does not load against torch {torch.__version__} ({e}); "
            "fbgemm-gpu-cpu 1.8.0 is the build that matches torch 2.13.0."
        )
        return 1
    try:
        out = torch.ops.fbgemm.asynchronous_complete_cumsum(torch.tensor([1, 2, 3]))
        assert out.tolist() == [0, 1, 3, 6], out
    except Exception as e:  # noqa: BLE001
        print(
            f"self-check failed: fbgemm operators are not registered for torch {torch.__version__} "
            f"({type(e).__name__}: {e}); this is an fbgemm/torch version mismatch."
        )
        return 1
    try:
        import torchrec
        from torchrec.distributed.model_parallel import DistributedModelParallel  # noqa: F401
    except Exception as e:  # noqa: BLE001
        print(f"self-check failed: torchrec does not import ({type(e).__name__}: {e}).")
        return 1
    print(f"self-check ok: torch {torch.__version__}, torchrec {torchrec.__version__}, fbgemm operator ran")
    return 0


if __name__ == "__main__":
    sys.exit(main())
