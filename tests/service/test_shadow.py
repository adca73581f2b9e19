"""Shadow agreement: the counts match a direct comparison of the two variants on the same images, shadow work is
dropped (and counted) when the service is busy, and it never changes what the client gets."""

import json
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from service.app import create_app
from service.settings import Settings
from tests.helpers.images import encode


def photo(seed: int) -> bytes:
    image = Image.new("RGB", (48, 40))
    image.putdata(
        [((x * seed) % 256, (y * 7 + seed * 31) % 256, (x * y + seed) % 256) for y in range(40) for x in range(48)]
    )
    return encode(image, "PNG")


def counts(client) -> dict[str, float]:
    found = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(("fpet_shadow_requests_total{", "fpet_shadow_dropped_total{")):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def agree(client, value: str) -> float:
    return counts(client).get(f'fpet_shadow_requests_total{{agree="{value}",model="fpet",reference="backbone"}}', 0)


def settle(client) -> None:
    state = client.app.state.fpet
    end = time.monotonic() + 30
    while (state.shadows or any(not b.idle for b in state.batchers.values())) and time.monotonic() < end:
        time.sleep(0.01)


@pytest.fixture
def client(tiny_bundles):
    settings = Settings(
        bundles=[str(tiny_bundles["fpet"]), str(tiny_bundles["backbone"])],
        providers="cpu",
        runtime="onnxruntime",
        shadow_rate=1.0,
    )
    with TestClient(create_app(settings)) as client:
        yield client


def test_shadow_agreement_matches_a_direct_comparison(client):
    """Counters are the process's: each test reads what it added."""
    before = agree(client, "true"), agree(client, "false"), counts(client)
    images = [photo(seed) for seed in range(24)]
    for image in images:
        answer = client.post("/classify", content=image, headers={"Content-Type": "image/png"})
        assert answer.status_code == 200 and answer.json()["model"] == "fpet"
        settle(client)  # one at a time: the service is idle when each shadow run is decided
    agreed, disagreed = agree(client, "true") - before[0], agree(client, "false") - before[1]
    direct = []
    for image in images:
        tops = [
            client.post(f"/models/{m}/classify", content=image, headers={"Content-Type": "image/png"}).json()[
                "predictions"
            ][0]["index"]
            for m in ("fpet", "backbone")
        ]
        direct.append(tops[0] == tops[1])
    assert agreed == sum(direct) and disagreed == len(direct) - sum(direct)
    dropped = {k: v - before[2].get(k, 0) for k, v in counts(client).items() if k.startswith("fpet_shadow_dropped")}
    assert not any(dropped.values())


def test_a_reference_that_is_the_same_model_agrees_on_every_image(tiny_bundles, tmp_path):
    """The counterpart of the direct comparison (whose tiny models may agree on all images or none): a twin of the
    fpet bundle under another name must agree every time."""
    twin = tmp_path / "twin"
    shutil.copytree(tiny_bundles["fpet"], twin)
    manifest = json.loads((twin / "manifest.json").read_text())
    (twin / "manifest.json").write_text(json.dumps({**manifest, "variant": "twin"}))
    settings = Settings(
        bundles=[str(tiny_bundles["fpet"]), str(twin)],
        providers="cpu",
        runtime="onnxruntime",
        shadow_rate=1.0,
        shadow_reference="twin",
    )
    with TestClient(create_app(settings)) as client:
        key = 'fpet_shadow_requests_total{agree="%s",model="fpet",reference="twin"}'
        before = {v: counts(client).get(key % v, 0) for v in ("true", "false")}
        for seed in range(12):
            assert (
                client.post("/classify", content=photo(seed), headers={"Content-Type": "image/png"}).status_code == 200
            )
            settle(client)
        after = {v: counts(client).get(key % v, 0) for v in ("true", "false")}
        assert after["true"] - before["true"] == 12 and after["false"] == before["false"]


def test_shadow_work_is_dropped_when_busy_and_every_request_is_accounted_for(client):
    state = client.app.state.fpet
    busy = 'fpet_shadow_dropped_total{reason="busy"}'
    start = counts(client).get(busy, 0), agree(client, "true") + agree(client, "false")
    ticket = client.portal.call(state.batchers["backbone"].admit)  # a backbone request holds a place: busy
    answer = client.post("/classify", content=photo(1), headers={"Content-Type": "image/png"})
    assert answer.status_code == 200
    assert counts(client)[busy] - start[0] == 1
    client.portal.call(ticket.release)
    with ThreadPoolExecutor(6) as pool:
        codes = list(
            pool.map(
                lambda i: client.post("/classify", content=photo(i), headers={"Content-Type": "image/png"}).status_code,
                range(36),
            )
        )
    settle(client)
    assert codes == [200] * 36
    shadowed = agree(client, "true") + agree(client, "false") - start[1]
    assert shadowed + counts(client)[busy] - start[0] == 37
