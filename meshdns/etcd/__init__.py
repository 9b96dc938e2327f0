"""The registry in etcd: a JSON-gateway client, the key layout, the local copy, writes."""
