"""Dense object concepts (Leopart-style: Ziegler & Asano, CVPR 2022).

Patch features -> Sinkhorn-balanced part clusters -> cluster-based foreground extraction ->
co-occurrence graph + Louvain communities -> concept masks -> COCO instances.

Entry points: `pipeline.segment(records, backbone, cfg, out_dir, device)` writes `out_dir/dense/`;
`evaluate.evaluate_dense(run_dir, labels_dir=None)` scores it against label maps.
The pure steps live in `extract`, `parts`, `foreground`, `graph` and `masks`.
"""
