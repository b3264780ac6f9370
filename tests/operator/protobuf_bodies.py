"""Kubernetes protobuf request bodies -> JSON objects, for the emulated API.

`kubectl create configmap|secret` sends built-in kinds as protobuf
(`application/vnd.kubernetes.protobuf`: the bytes `k8s\\0`, then a runtime.Unknown
wrapping the object), and kmock reads only JSON. These few messages are decoded from
the wire format by field number (k8s.io/api/core/v1/generated.proto), so the README's
exact commands run against the emulator. Test code: kinds beyond these are refused.
"""

from __future__ import annotations

import base64
from typing import Any, Iterator

MAGIC = b"k8s\x00"

# runtime.Unknown / TypeMeta / ObjectMeta field numbers.
UNKNOWN_TYPE_META, UNKNOWN_RAW = 1, 2
TYPE_META_API_VERSION, TYPE_META_KIND = 1, 2
META_STRINGS = {1: "name", 2: "generateName", 3: "namespace"}
META_MAPS = {11: "labels", 12: "annotations"}
# kind -> {field number: (JSON name, how its map values are written)}
KIND_MAPS = {
    "ConfigMap": {2: ("data", "text"), 3: ("binaryData", "base64")},
    "Secret": {2: ("data", "base64"), 4: ("stringData", "text")},
}
KIND_STRINGS = {"Secret": {3: "type"}}
KIND_BOOLS = {"ConfigMap": {4: "immutable"}, "Secret": {5: "immutable"}}


class UnsupportedBody(ValueError):
    pass


def is_protobuf(content_type: str) -> bool:
    return content_type.split(";")[0].strip() == "application/vnd.kubernetes.protobuf"


def decode_object(body: bytes) -> dict[str, Any]:
    """The JSON form of a protobuf-encoded ConfigMap or Secret."""
    if not body.startswith(MAGIC):
        raise UnsupportedBody("not a Kubernetes protobuf body (no k8s\\0 prefix)")
    envelope = _fields(body[len(MAGIC):])
    type_meta = _fields(envelope.get(UNKNOWN_TYPE_META, [b""])[0])
    api_version = _text(type_meta, TYPE_META_API_VERSION)
    kind = _text(type_meta, TYPE_META_KIND)
    if kind not in KIND_MAPS:
        raise UnsupportedBody(f"the emulator decodes only {sorted(KIND_MAPS)} from protobuf, not {kind!r}")
    message = _fields(envelope.get(UNKNOWN_RAW, [b""])[0])
    obj: dict[str, Any] = {"apiVersion": api_version, "kind": kind,
                           "metadata": _metadata(_fields(message.get(1, [b""])[0]))}
    for number, (name, encoding) in KIND_MAPS[kind].items():
        entries = _map(message.get(number, []), as_text=encoding == "text")
        if entries:
            obj[name] = entries if encoding == "text" else {
                key: base64.b64encode(value).decode() for key, value in entries.items()}
    for number, name in KIND_STRINGS.get(kind, {}).items():
        if _text(message, number):
            obj[name] = _text(message, number)
    for number, name in KIND_BOOLS.get(kind, {}).items():
        if number in message:
            obj[name] = bool(message[number][0])
    return obj


def _metadata(fields: dict[int, list[Any]]) -> dict[str, Any]:
    # proto2 writes unset strings as "": an API server treats those as absent.
    meta: dict[str, Any] = {name: _text(fields, number) for number, name in META_STRINGS.items()
                            if _text(fields, number)}
    for number, name in META_MAPS.items():
        if number in fields:
            meta[name] = _map(fields[number], as_text=True)
    return meta


def _map(entries: list[bytes], *, as_text: bool) -> dict[str, Any]:
    result = {}
    for entry in entries:
        fields = _fields(entry)
        value = fields.get(2, [b""])[0]
        result[_text(fields, 1)] = value.decode() if as_text else value
    return result


def _text(fields: dict[int, list[Any]], number: int) -> str:
    return fields.get(number, [b""])[0].decode()


def _fields(data: bytes) -> dict[int, list[Any]]:
    fields: dict[int, list[Any]] = {}
    for number, value in _wire(data):
        fields.setdefault(number, []).append(value)
    return fields


def _wire(data: bytes) -> Iterator[tuple[int, Any]]:
    """(field number, value) pairs: ints for varints, bytes for length-delimited fields."""
    position = 0
    while position < len(data):
        key, position = _varint(data, position)
        number, wire_type = key >> 3, key & 7
        if wire_type == 0:
            value, position = _varint(data, position)
        elif wire_type == 2:
            length, position = _varint(data, position)
            value, position = data[position:position + length], position + length
        elif wire_type in (1, 5):
            size = 8 if wire_type == 1 else 4
            value, position = data[position:position + size], position + size
        else:
            raise UnsupportedBody(f"protobuf wire type {wire_type} (groups) is not used by Kubernetes")
        yield number, value


def _varint(data: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[position]
        position += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, position
        shift += 7
