from bench.train import bench_train, markdown


def test_train_benchmark_smoke():
    rows = bench_train("vit_tiny_patch16_224", 32, ["adaptformer"], ["none", "6:0.5"], batch_size=4, steps=1, warmup=0,
                       repeats=1, threads=1, log=lambda _: None)  # fmt: skip
    assert [r["schedule"] for r in rows] == ["none", "6:0.5"]
    assert rows[0]["speedup"] == 1.0 and rows[1]["images_per_s"] > 0 and rows[1]["peak_rss_mb"] > 0
    assert "| adaptformer | `6:0.5` |" in markdown(rows)
