"""Build the Dataflow job graph of `remap embed` offline, to check flags, worker image and
transforms before a launch costs anything:

    python deploy/dataflow/dry_run.py --input samples/images --output gs://my-bucket/store \
        --model model.pt --project my-project --region europe-west1 \
        --temp_location gs://my-bucket/tmp --sdk_container_image $WORKER_IMAGE \
        --experiments=use_runner_v2 --number_of_worker_harness_threads=4 --no_auth

Forces `--runner=DataflowRunner --dry_run=True` and builds the job the way `remap embed` does
(`pipelines.launch.prepare_run`, whose dry run skips the store): the graph is built and
translated for Dataflow but not submitted. Offline as long as --input and --model are local
(the launcher lists the input while building the graph) and --no_auth is given; the store is
not read (the graph is built as for a first run). `remap embed ... --runner=DataflowRunner
--dry_run=True` does the same and prints the top-level transforms. Project, region and bucket
must be *valid names* (e.g. a bucket name of 3+ characters), or Beam tries to create a default
staging bucket over the network.
Prints one JSON object: top-level transforms, worker images, experiments.
"""

from __future__ import annotations

import json
import sys


def build_job(argv: list[str]):
    """-> (Dataflow job object of the dry run, summary dict)."""
    from apache_beam.options.pipeline_options import DebugOptions
    from apache_beam.portability.api import beam_runner_api_pb2

    from pipelines.launch import prepare_run

    argv = [a for a in argv if not a.startswith(("--runner", "--dry_run"))]
    prepared = prepare_run([*argv, "--runner=DataflowRunner", "--dry_run=True"])
    options = prepared.options
    job = prepared.pipeline.run().job
    proto = job.proto_pipeline
    images = sorted({beam_runner_api_pb2.DockerPayload.FromString(env.payload).container_image
                     for env in proto.components.environments.values()
                     if env.urn == "beam:env:docker:v1"})
    top = sorted({t.unique_name for t in proto.components.transforms.values()
                  if t.unique_name and "/" not in t.unique_name
                  and not t.unique_name.startswith("ref_")})
    return job, {"transforms": top, "worker_images": images, "model": prepared.info["model"],
                 "experiments": sorted(options.view_as(DebugOptions).experiments or [])}


def main(argv: list[str] | None = None) -> int:
    _, summary = build_job(list(sys.argv[1:] if argv is None else argv))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
