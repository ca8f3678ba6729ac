"""Create the team's S3 bucket, private: public access blocked, no public ACL, and a bucket
policy that lets in only the team's principal. Idempotent (an existing bucket is re-secured).

    AWS_ACCESS_KEY_ID=... AWS_SECRET_ACCESS_KEY=... python scripts/s3_bucket.py \\
        --bucket gsm8k-grpo --principal arn:aws:iam::123456789012:user/team [--endpoint-url http://s3:5000]

One bucket holds both shared stores: MLflow's artifacts under mlflow/ (the tracking server's
--artifacts-destination) and the DVC remote under dvc/. Credentials come from the environment
(boto3's usual chain), never from arguments. docker-compose.yml runs it once as `s3-init`;
the tests (tests/servers.py) run it against their loopback S3 server.
"""
from __future__ import annotations

import argparse
import json
import os

BLOCK_ALL_PUBLIC = {"BlockPublicAcls": True, "IgnorePublicAcls": True, "BlockPublicPolicy": True,
                    "RestrictPublicBuckets": True}


def bucket_policy(bucket: str, principal: str) -> dict:
    """Every S3 action on the bucket and its objects, for `principal` only (no "*" principal)."""
    return {"Version": "2012-10-17", "Statement": [{
        "Sid": "TeamOnly", "Effect": "Allow", "Principal": {"AWS": principal}, "Action": "s3:*",
        "Resource": [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"]}]}


def secure_bucket(bucket: str, principal: str, endpoint_url: str | None = None, region: str = "us-east-1") -> None:
    import boto3
    from botocore.exceptions import ClientError

    s3 = boto3.client("s3", endpoint_url=endpoint_url, region_name=region)
    try:
        s3.head_bucket(Bucket=bucket)
        exists = True
    except ClientError as err:
        if err.response["Error"]["Code"] not in ("404", "NoSuchBucket"):
            raise
        exists = False
    if not exists:
        extra = {} if region == "us-east-1" else {"CreateBucketConfiguration": {"LocationConstraint": region}}
        s3.create_bucket(Bucket=bucket, ACL="private", **extra)
    s3.put_public_access_block(Bucket=bucket, PublicAccessBlockConfiguration=BLOCK_ALL_PUBLIC)
    s3.put_bucket_policy(Bucket=bucket, Policy=json.dumps(bucket_policy(bucket, principal)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bucket", required=True, help="bucket name")
    parser.add_argument("--principal", required=True, help="IAM ARN of the team's user or role, the only one let in")
    parser.add_argument("--endpoint-url", help="an S3-compatible server (default: AWS S3)")
    parser.add_argument("--region", default=os.environ.get("AWS_DEFAULT_REGION", "us-east-1"),
                        help="bucket region (default: AWS_DEFAULT_REGION or us-east-1)")
    args = parser.parse_args()
    secure_bucket(args.bucket, args.principal, args.endpoint_url, args.region)
    print(f"s3://{args.bucket}: private, public access blocked, policy for {args.principal} only")


if __name__ == "__main__":
    main()
