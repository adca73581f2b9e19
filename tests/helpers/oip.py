"""Open Inference Protocol inputs for tritonclient's HTTP and gRPC clients, the documented client-side
preprocessing, and /classify's probabilities to compare with."""

import io

import httpx
import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from PIL import Image


def classify_probabilities(server: str, image: bytes, model: str = "fpet", classes: int = 3) -> list[float]:
    """/classify's probabilities for one image, in class order."""
    body = httpx.post(
        f"{server}/classify?model={model}&top_k={classes}", content=image, headers={"Content-Type": "image/png"}
    ).json()
    probabilities = [0.0] * classes
    for p in body["predictions"]:
        probabilities[p["index"]] = p["score"]
    return probabilities


def preprocess(image: bytes, meta: dict) -> np.ndarray:
    """The documented client-side transform (README): RGB, bicubic resize to S x S, /255, mean/std, CHW, float32."""
    pre = meta["preprocessing"]
    size = pre["img_size"]
    rgb = Image.open(io.BytesIO(image)).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)
    x = (np.asarray(rgb, dtype=np.float32) / np.float32(255) - np.float32(pre["mean"])) / np.float32(pre["std"])
    return x.transpose(2, 0, 1).astype(np.float32)


def image_input(images: list[bytes], binary: bool = True) -> httpclient.InferInput:
    tensor = httpclient.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object), binary_data=binary)
    return tensor


def grpc_image_input(images: list[bytes]) -> grpcclient.InferInput:
    tensor = grpcclient.InferInput("image", [len(images)], "BYTES")
    tensor.set_data_from_numpy(np.array(images, dtype=object))
    return tensor
