"""s3:// shards through boto3, against moto's S3 server on 127.0.0.1 (skipped without moto)."""
from __future__ import annotations

import os
import socket

import pytest

from data_helpers.shards import keys_of, stream, take, write_uneven

boto3 = pytest.importorskip("boto3")
moto_server = pytest.importorskip("moto.server")


@pytest.fixture()
def s3(monkeypatch):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    for k in ("AWS_PROFILE", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(k, raising=False)
    yield f"http://127.0.0.1:{port}"
    server.stop()


def test_s3_directory_and_pattern_read_like_local(tmp_path, s3):
    keys = write_uneven(str(tmp_path))
    client = boto3.client("s3", endpoint_url=s3)
    client.create_bucket(Bucket="data")
    for name in os.listdir(tmp_path):
        client.upload_file(str(tmp_path / name), "data", f"sets/uneven/{name}")
    local = keys_of(take(stream(str(tmp_path), batch_size=82, num_workers=2), 1))  # one epoch: 81 + 1 padding
    assert set(local) == set(keys)
    remote_dir = keys_of(take(stream("s3://data/sets/uneven/", batch_size=82, num_workers=2, s3_endpoint_url=s3), 1))
    assert remote_dir == local
    pattern = "s3://data/sets/uneven/{000000..000006}.tar"
    assert keys_of(take(stream(pattern, batch_size=82, num_workers=2, s3_endpoint_url=s3), 1)) == local
    # a missing object is an unreadable shard, counted under the skip policy
    client.delete_object(Bucket="data", Key="sets/uneven/000003.tar")
    st = stream("s3://data/sets/uneven/", batch_size=9, s3_endpoint_url=s3, max_bad_fraction=0.5)
    take(st, 7)
    assert st.stats()["bad/unreadable_shard"] >= 1


def test_s3_img2dataset_prefix_and_data_index(tmp_path, s3):
    """An img2dataset folder under an S3 prefix: counts from its stats objects (no scan); then
    `gentrain data index` on the prefix writes index.json there, with the same counts."""
    pytest.importorskip("pyarrow")
    from data_helpers.img2dataset import write_img2dataset
    from gentrain.data_pipeline.index import build_index
    from gentrain.data_pipeline.shardlist import resolve_shards

    kept = write_img2dataset(str(tmp_path), shards=2, per_shard=6, failed=((0, 2),))
    client = boto3.client("s3", endpoint_url=s3)
    client.create_bucket(Bucket="laion")
    for name in os.listdir(tmp_path):
        client.upload_file(str(tmp_path / name), "laion", f"part-0/{name}")
    shards = resolve_shards("s3://laion/part-0/", s3_endpoint_url=s3)
    assert shards.counts == (5, 6) and shards.scanned == 0
    got = keys_of(take(stream("s3://laion/part-0/", batch_size=11, image_size=16, s3_endpoint_url=s3), 1))
    assert sorted(got) == sorted(kept)
    build_index("s3://laion/part-0/", processes=1, s3_endpoint_url=s3)
    assert client.head_object(Bucket="laion", Key="part-0/index.json")["ContentLength"] > 0
    assert resolve_shards("s3://laion/part-0/", s3_endpoint_url=s3).counts == (5, 6)
    # an unreachable endpoint fails at once, naming the URL
    with pytest.raises(Exception, match="s3://laion/part-0/"):
        resolve_shards("s3://laion/part-0/", s3_endpoint_url="http://127.0.0.1:9")
