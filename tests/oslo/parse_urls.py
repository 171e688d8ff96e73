"""Parse each transport URL given (a JSON list on stdin) with
oslo.messaging's own TransportURL.parse; print one JSON object per URL:
the parse, or {"error": ...}. Used by tests/transport_url.rs."""
import json
import sys

from oslo_config import cfg
import oslo_messaging

conf = cfg.ConfigOpts()
out = []
for url in json.load(sys.stdin):
    try:
        u = oslo_messaging.TransportURL.parse(conf, url)
        out.append({
            "transport": u.transport,
            "virtual_host": u.virtual_host,
            "hosts": [{"hostname": h.hostname, "port": h.port,
                       "username": h.username, "password": h.password}
                      for h in u.hosts],
            "query": u.query,
        })
    except Exception as e:  # noqa: BLE001 - any refusal counts as one
        out.append({"error": "%s: %s" % (type(e).__name__, e)})
print(json.dumps(out))
