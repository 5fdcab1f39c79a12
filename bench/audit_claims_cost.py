"""CPU cost of the audit's interpretability claims (nad_guard.audit.claims): process CPU time (one torch
thread) of the guard's clean pass, of every misprediction's explanation and of the subnetwork-explanation
deletion test and, with ``--encoder``, of an NND encoder's class paths (``nad-guard audit --encoder``), on
the same images as a committed audit. CPU time, unlike wall time, barely moves when other processes share
the cores.

    OMP_NUM_THREADS=1 python bench/audit_claims_cost.py --artifact default --data mnist5k
    OMP_NUM_THREADS=1 python bench/audit_claims_cost.py --artifact bench/results/guard_cifar10-resnet20 --data cifar10
    (either with --encoder bench/results/encoder_mnist-cnn or bench/results/encoder_cifar10-resnet20)
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    from nad_guard.audit import load_split, run_audit
    from nad_guard.audit.claims import claims_pass
    from nad_guard.guard import Guard, resolve_guard_dir
    from nad_guard.runinfo import machine_info

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--artifact", default="default")
    ap.add_argument("--data", default="mnist5k")
    ap.add_argument("--saliency-images", type=int, default=200)
    ap.add_argument("--encoder", default=None, help="an NND encoder directory: also time its class paths")
    args = ap.parse_args()
    torch.set_num_threads(1)
    guard = Guard.load(resolve_guard_dir(args.artifact), device="cpu")
    data = load_split(args.data, "test", None, guard)
    c0 = time.process_time()
    result = run_audit(guard, data, progress=False, gallery_size=0, saliency_images=0, explain=False)
    c1 = time.process_time()
    claims_pass(guard, data, result.clean, saliency_images=0, explain=True)
    c2 = time.process_time()
    claims_pass(guard, data, result.clean, saliency_images=args.saliency_images, explain=False)
    c3 = time.process_time()
    encoder_s = None
    if args.encoder:
        from nad_guard.encoder import ArchitectureEncoder

        enc = ArchitectureEncoder.load(args.encoder, guard.classifier)
        c4 = time.process_time()
        claims_pass(guard, data, result.clean, saliency_images=0, explain=False, encoder=enc)
        encoder_s = round(time.process_time() - c4, 1)
    print(json.dumps({"artifact": args.artifact, "data": args.data, "images": len(result.clean),
                      "mispredictions": int((~result.clean.correct).sum()), "saliency_images": args.saliency_images,
                      "cpu_s": {"audit_without_claims": round(c1 - c0, 1), "explain": round(c2 - c1, 1),
                                "saliency": round(c3 - c2, 1),
                                **({"encoder_class_paths": encoder_s} if args.encoder else {})},
                      "machine": machine_info()}))


if __name__ == "__main__":
    main()
