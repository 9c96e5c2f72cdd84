"""Kubernetes context: pod name, namespace and container name for a pod uid / container id.

The cgroup path already gives the pod uid and the container id (cgroup.py);
names come from the node's pod list, read from either

  * the API server (default in a DaemonSet): GET /api/v1/pods?fieldSelector=
    spec.nodeName=<node>, with the service account's token and CA; needs
    `get`/`list` on pods (deploy/kubernetes/rbac.yaml), or
  * the kubelet: GET /pods on its authenticated port (https://127.0.0.1:10250,
    token needs nodes/proxy) or its read-only port (http://127.0.0.1:10255).

An alert never waits on the network: a background thread refreshes the pod
list every `refresh` (the cache's TTL) and whenever a lookup misses (at most
once per MIN_REFRESH_S); lookups only read the cache. When the source is
unreachable the fields stay null. Pods that left the list are kept for
`retain` so alerts about a pod that just died still get its name.

    [kubernetes]
    enabled = false
    source = "apiserver"            # or "kubelet"
    api_url = ""                    # "" = in cluster: https://$KUBERNETES_SERVICE_HOST:$KUBERNETES_SERVICE_PORT
    kubelet_url = "https://127.0.0.1:10250"
    node_name = ""                  # "" = $NODE_NAME (the DaemonSet sets it from spec.nodeName)
    token_file = "/var/run/secrets/kubernetes.io/serviceaccount/token"
    ca_file = "/var/run/secrets/kubernetes.io/serviceaccount/ca.crt"
    insecure_skip_tls_verify = false   # the kubelet's serving cert is often self-signed
    refresh = "30s"
    retain = "10m"
    timeout = "2s"
"""

from __future__ import annotations

import json
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlsplit

from ksift.errors import ConfigError
from ksift.settings_fields import boolean, choice, duration_between, string

logger = logging.getLogger(__name__)

SOURCES = ("apiserver", "kubelet")
SA_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
MAX_POD_LIST_BYTES = 64 << 20  # a node's pod list is far smaller; bounds memory on a broken answer
MIN_REFRESH_S = 5.0  # a stream of misses (pods that are not in any list) must not hammer the source
_FIELDS = ("enabled", "source", "api_url", "kubelet_url", "node_name", "token_file", "ca_file",
           "insecure_skip_tls_verify", "refresh", "retain", "timeout")


@dataclass(frozen=True)
class KubernetesSettings:
    enabled: bool = False
    source: str = "apiserver"
    api_url: str = ""
    kubelet_url: str = "https://127.0.0.1:10250"
    node_name: str = ""
    token_file: str = f"{SA_DIR}/token"
    ca_file: str = f"{SA_DIR}/ca.crt"
    insecure_skip_tls_verify: bool = False
    refresh_s: float = 30.0
    retain_s: float = 600.0
    timeout_s: float = 2.0


def parse_kubernetes(table: dict, source: str) -> KubernetesSettings:
    """Parse the [kubernetes] table; errors name kubernetes.<field> and the bad value."""
    for name in table:
        if name not in _FIELDS:
            raise ConfigError(source, f"unknown field (allowed: {', '.join(_FIELDS)})", field=f"kubernetes.{name}")
    values: dict[str, Any] = {}
    for name in ("enabled", "insecure_skip_tls_verify"):
        if name in table:
            values[name] = boolean(table[name], source, f"kubernetes.{name}")
    if "source" in table:
        values["source"] = choice(table["source"], source, "kubernetes.source", SOURCES)
    for name in ("api_url", "kubelet_url"):
        if name in table:
            values[name] = _url(table[name], source, f"kubernetes.{name}", allow_empty=name == "api_url")
    for name in ("node_name", "token_file", "ca_file"):
        if name in table:
            values[name] = string(table[name], source, f"kubernetes.{name}")
    for name, attr, low, high in (("refresh", "refresh_s", 1.0, 3600.0), ("retain", "retain_s", 0.0, 86400.0),
                                  ("timeout", "timeout_s", 0.1, 30.0)):
        if name in table:
            values[attr] = duration_between(table[name], source, f"kubernetes.{name}", low, high)
    return KubernetesSettings(**values)


def _url(value: object, source: str, field: str, allow_empty: bool) -> str:
    if isinstance(value, str) and allow_empty and not value.strip():
        return ""
    parts = urlsplit(value.strip()) if isinstance(value, str) else None
    if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(source, f"invalid value {value!r}: must be an http:// or https:// URL", field=field)
    return value.strip().rstrip("/")


# -- the pod list -------------------------------------------------------------------


@dataclass(frozen=True)
class PodContext:
    pod_name: str | None = None
    pod_namespace: str | None = None
    container_name: str | None = None


@dataclass(frozen=True)
class PodIndex:
    """pod uid -> (name, namespace); container id -> (pod uid, container name)."""

    pods: Mapping[str, tuple[str, str]]
    containers: Mapping[str, tuple[str, str]]
    malformed: int = 0


def parse_pod_list(document: Any) -> PodIndex:
    """Index a PodList (kubelet /pods or API server /api/v1/pods); bad items are skipped and counted."""
    items = document.get("items") if isinstance(document, dict) else None
    if not isinstance(items, list):
        raise ValueError("not a PodList: no items array")
    pods: dict[str, tuple[str, str]] = {}
    containers: dict[str, tuple[str, str]] = {}
    malformed = 0
    for item in items:
        meta = item.get("metadata") if isinstance(item, dict) else None
        if not isinstance(meta, dict) or not all(isinstance(meta.get(k), str) and meta.get(k)
                                                 for k in ("uid", "name", "namespace")):
            malformed += 1
            continue
        uid = meta["uid"].lower()
        pods[uid] = (meta["name"], meta["namespace"])
        status = item.get("status") if isinstance(item.get("status"), dict) else {}
        for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
            for entry in status.get(key) or ():
                if not isinstance(entry, dict):
                    continue
                cid, name = _container_id(entry.get("containerID")), entry.get("name")
                if cid and isinstance(name, str):
                    containers[cid] = (uid, name)
    return PodIndex(pods, containers, malformed)


def _container_id(value: Any) -> str | None:
    """"containerd://<id>", "cri-o://<id>", "docker://<id>" -> "<id>"."""
    if not isinstance(value, str) or "://" not in value:
        return None
    return value.split("://", 1)[1].lower() or None


# -- the resolver -----------------------------------------------------------------------


class PodMetadataResolver:
    """A cache of the node's pods, refreshed in the background; lookups never block.

    `fetch` returns the raw PodList JSON (blocking, bounded by its own
    timeout); it runs only in the resolver's thread, or in `refresh()` when a
    test calls it directly.
    """

    def __init__(self, fetch: Callable[[], bytes], refresh_s: float = 30.0, retain_s: float = 600.0,
                 clock: Callable[[], float] = time.monotonic, min_refresh_s: float = MIN_REFRESH_S,
                 describe: str = "pod list"):
        self._fetch = fetch
        self.refresh_s = refresh_s
        self.retain_s = retain_s
        self.min_refresh_s = min_refresh_s
        self.describe = describe
        self._clock = clock
        # Replaced whole by refresh(), read by lookup(): no lock needed for a reference swap.
        self._pods: dict[str, tuple[str, str, float]] = {}  # uid -> (name, namespace, last seen)
        self._containers: dict[str, tuple[str, str, float]] = {}  # id -> (pod uid, name, last seen)
        self._last_attempt: float | None = None
        self._failing = False
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.refreshes = 0
        self.refresh_errors = 0
        self.malformed = 0
        self.hits = 0
        self.misses = 0
        self.last_error: str | None = None

    def lookup(self, pod_uid: str | None, container_id: str | None) -> PodContext | None:
        """Names for a pod uid and/or container id from the cache; None when unknown. Never blocks."""
        pods, containers = self._pods, self._containers
        container_name = None
        if container_id and (entry := containers.get(container_id.lower())):
            pod_uid = pod_uid or entry[0]
            container_name = entry[1]
        pod = pods.get(pod_uid.lower()) if pod_uid else None
        if pod is None and container_name is None:
            self.misses += 1
            self._nudge()
            return None
        self.hits += 1
        return PodContext(pod_name=pod[0] if pod else None, pod_namespace=pod[1] if pod else None,
                          container_name=container_name)

    def refresh(self) -> bool:
        """Fetch the pod list once and merge it into the cache; False (logged) on failure."""
        self._last_attempt = self._clock()
        try:
            index = parse_pod_list(json.loads(self._fetch()))
        except Exception as exc:  # unreachable, refused, garbage: keep the old cache
            self.refresh_errors += 1
            self.last_error = f"{type(exc).__name__}: {exc}"
            log = logger.debug if self._failing else logger.warning
            self._failing = True
            log("kubernetes: cannot read the %s: %s (pod names stay empty until it answers)", self.describe,
                self.last_error)
            return False
        now = self._clock()
        keep_after = now - self.retain_s
        pods = {uid: v for uid, v in self._pods.items() if v[2] >= keep_after}
        pods.update((uid, (name, ns, now)) for uid, (name, ns) in index.pods.items())
        containers = {cid: v for cid, v in self._containers.items() if v[2] >= keep_after}
        containers.update((cid, (uid, name, now)) for cid, (uid, name) in index.containers.items())
        self._pods, self._containers = pods, containers
        self.refreshes += 1
        self.malformed += index.malformed
        if self._failing:
            self._failing = False
            logger.info("kubernetes: %s answers again (%d pods)", self.describe, len(pods))
        return True

    @property
    def size(self) -> int:
        return len(self._pods)

    def stats(self) -> dict[str, int]:
        return {"pods": len(self._pods), "refreshes": self.refreshes, "refresh_errors": self.refresh_errors,
                "malformed": self.malformed, "hits": self.hits, "misses": self.misses}

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="ksift-kubernetes", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the thread (it may be inside a fetch: that ends within the fetch's timeout)."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=0.5)
            self._thread = None

    def _nudge(self) -> None:
        last = self._last_attempt
        if self._thread is not None and (last is None or self._clock() - last >= self.min_refresh_s):
            self._wake.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._wake.wait(self.refresh_s)
            self._wake.clear()


# -- the sources --------------------------------------------------------------------


class HttpPodSource:
    """GET a PodList over HTTP(S) with a bearer token (re-read each time: projected tokens rotate)."""

    def __init__(self, url: str, token_file: str | None, ca_file: str | None, insecure: bool, timeout_s: float):
        self.url = url
        self.token_file = token_file
        self.timeout_s = timeout_s
        self._context: ssl.SSLContext | None = None
        if url.startswith("https://"):
            cafile = ca_file if ca_file and os.path.exists(ca_file) and not insecure else None
            self._context = ssl.create_default_context(cafile=cafile)
            if insecure:
                self._context.check_hostname = False
                self._context.verify_mode = ssl.CERT_NONE

    def __call__(self) -> bytes:
        import urllib.request  # here: the agent pays for it only when [kubernetes] is on

        request = urllib.request.Request(self.url, headers={"Accept": "application/json", "User-Agent": "ksift"})
        token = self._token()
        # A token goes only over TLS: the kubelet's read-only port is plain HTTP and needs none.
        if token and self._context is not None:
            request.add_header("Authorization", f"Bearer {token}")
        with urllib.request.urlopen(request, timeout=self.timeout_s, context=self._context) as response:
            data = response.read(MAX_POD_LIST_BYTES + 1)
        if len(data) > MAX_POD_LIST_BYTES:
            raise ValueError(f"pod list larger than {MAX_POD_LIST_BYTES} bytes")
        return data

    def _token(self) -> str | None:
        if not self.token_file:
            return None
        try:
            with open(self.token_file, encoding="utf-8") as fh:
                return fh.read().strip() or None
        except OSError:
            return None


def pod_list_url(settings: KubernetesSettings, env: Mapping[str, str]) -> str:
    """Where the node's pods are listed, from the settings and (in a pod) the environment."""
    if settings.source == "kubelet":
        return settings.kubelet_url + "/pods"
    api = settings.api_url
    if not api:
        host, port = env.get("KUBERNETES_SERVICE_HOST"), env.get("KUBERNETES_SERVICE_PORT", "443")
        if not host:
            raise ConfigError("[kubernetes]", "not running in a pod (no KUBERNETES_SERVICE_HOST): set api_url",
                              field="kubernetes.api_url")
        api = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
    node = settings.node_name or env.get("NODE_NAME", "")
    if not node:
        # Without a node filter every pod of the cluster would be listed, on every node.
        raise ConfigError("[kubernetes]", "unknown node: set node_name, or NODE_NAME from spec.nodeName",
                          field="kubernetes.node_name")
    return f"{api}/api/v1/pods?fieldSelector={quote('spec.nodeName=' + node, safe='')}"


def build_pod_resolver(settings: KubernetesSettings, env: Mapping[str, str] | None = None
                       ) -> PodMetadataResolver | None:
    """A resolver for the configured source (not started), or None when [kubernetes] is off."""
    if not settings.enabled:
        return None
    url = pod_list_url(settings, os.environ if env is None else env)
    fetch = HttpPodSource(url, settings.token_file or None, settings.ca_file or None,
                          settings.insecure_skip_tls_verify, settings.timeout_s)
    return PodMetadataResolver(fetch, refresh_s=settings.refresh_s, retain_s=settings.retain_s,
                               describe=f"{settings.source} pod list at {url.split('?', 1)[0]}")

