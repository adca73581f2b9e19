"""The floor for the event loop's cost per request in docs/benchmarks.md: a FastAPI route that only reads the body
and answers a small JSON, under the same server and load generator as the service. With a 1 MP JPEG body:

    .venv/bin/uvicorn --app-dir docs/bench bare_route:app --port 8102 --log-level warning &
    wrk -t1 -c16 -d10s -s post.lua http://127.0.0.1:8102/classify   # post.lua sets wrk.body to the photo
    # CPU per request: the server's utime+stime from /proc/PID/stat before and after, over the requests wrk reports
"""

from fastapi import FastAPI, Request

app = FastAPI()


@app.post("/classify")
async def classify(request: Request, top_k: int = 5) -> dict:
    body = await request.body()
    return {"bytes": len(body), "top_k": top_k}
