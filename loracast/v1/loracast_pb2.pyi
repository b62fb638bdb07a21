from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    FLOAT32: _ClassVar[DType]

class ApplyMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    APPLY_MODE_UNSPECIFIED: _ClassVar[ApplyMode]
    HOT_SWAP: _ClassVar[ApplyMode]
    MERGED: _ClassVar[ApplyMode]
DTYPE_UNSPECIFIED: DType
FLOAT16: DType
FLOAT32: DType
APPLY_MODE_UNSPECIFIED: ApplyMode
HOT_SWAP: ApplyMode
MERGED: ApplyMode

class TensorEntry(_message.Message):
    __slots__ = ("name", "shape", "offset", "nbytes")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    name: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    offset: int
    nbytes: int
    def __init__(self, name: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., offset: _Optional[int] = ..., nbytes: _Optional[int] = ...) -> None: ...

class AdapterManifest(_message.Message):
    __slots__ = ("adapter_id", "base_fingerprint", "hypernet_version", "rank", "alpha", "use_rslora", "target_modules", "dtype", "tensors", "total_size", "payload_sha256", "provenance", "other_dtype_sha256")
    class ProvenanceEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    HYPERNET_VERSION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    USE_RSLORA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAYLOAD_SHA256_FIELD_NUMBER: _ClassVar[int]
    PROVENANCE_FIELD_NUMBER: _ClassVar[int]
    OTHER_DTYPE_SHA256_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    base_fingerprint: str
    hypernet_version: str
    rank: int
    alpha: float
    use_rslora: bool
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    dtype: DType
    tensors: _containers.RepeatedCompositeFieldContainer[TensorEntry]
    total_size: int
    payload_sha256: str
    provenance: _containers.ScalarMap[str, str]
    other_dtype_sha256: str
    def __init__(self, adapter_id: _Optional[str] = ..., base_fingerprint: _Optional[str] = ..., hypernet_version: _Optional[str] = ..., rank: _Optional[int] = ..., alpha: _Optional[float] = ..., use_rslora: _Optional[bool] = ..., target_modules: _Optional[_Iterable[str]] = ..., dtype: _Optional[_Union[DType, str]] = ..., tensors: _Optional[_Iterable[_Union[TensorEntry, _Mapping]]] = ..., total_size: _Optional[int] = ..., payload_sha256: _Optional[str] = ..., provenance: _Optional[_Mapping[str, str]] = ..., other_dtype_sha256: _Optional[str] = ...) -> None: ...

class AdapterChunk(_message.Message):
    __slots__ = ("manifest", "data")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    manifest: AdapterManifest
    data: DataChunk
    def __init__(self, manifest: _Optional[_Union[AdapterManifest, _Mapping]] = ..., data: _Optional[_Union[DataChunk, _Mapping]] = ...) -> None: ...

class DataChunk(_message.Message):
    __slots__ = ("offset", "data")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class GenerateFromDescriptionRequest(_message.Message):
    __slots__ = ("description", "dtype")
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    description: str
    dtype: DType
    def __init__(self, description: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class DocumentChunk(_message.Message):
    __slots__ = ("data", "dtype", "budget_seconds")
    DATA_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    dtype: DType
    budget_seconds: float
    def __init__(self, data: _Optional[bytes] = ..., dtype: _Optional[_Union[DType, str]] = ..., budget_seconds: _Optional[float] = ...) -> None: ...

class InternalizeProgress(_message.Message):
    __slots__ = ("phase", "step", "probe_loss", "elapsed_seconds", "estimate_seconds")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PROBE_LOSS_FIELD_NUMBER: _ClassVar[int]
    ELAPSED_SECONDS_FIELD_NUMBER: _ClassVar[int]
    ESTIMATE_SECONDS_FIELD_NUMBER: _ClassVar[int]
    phase: str
    step: int
    probe_loss: float
    elapsed_seconds: float
    estimate_seconds: float
    def __init__(self, phase: _Optional[str] = ..., step: _Optional[int] = ..., probe_loss: _Optional[float] = ..., elapsed_seconds: _Optional[float] = ..., estimate_seconds: _Optional[float] = ...) -> None: ...

class InternalizeEvent(_message.Message):
    __slots__ = ("progress", "result")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    progress: InternalizeProgress
    result: GenerateResponse
    def __init__(self, progress: _Optional[_Union[InternalizeProgress, _Mapping]] = ..., result: _Optional[_Union[GenerateResponse, _Mapping]] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("manifest", "cached", "generation_seconds")
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    GENERATION_SECONDS_FIELD_NUMBER: _ClassVar[int]
    manifest: AdapterManifest
    cached: bool
    generation_seconds: float
    def __init__(self, manifest: _Optional[_Union[AdapterManifest, _Mapping]] = ..., cached: _Optional[bool] = ..., generation_seconds: _Optional[float] = ...) -> None: ...

class FetchAdapterRequest(_message.Message):
    __slots__ = ("adapter_id", "dtype", "offset", "chunk_size")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CHUNK_SIZE_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    dtype: DType
    offset: int
    chunk_size: int
    def __init__(self, adapter_id: _Optional[str] = ..., dtype: _Optional[_Union[DType, str]] = ..., offset: _Optional[int] = ..., chunk_size: _Optional[int] = ...) -> None: ...

class ListAdaptersRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class AdapterSummary(_message.Message):
    __slots__ = ("adapter_id", "hypernet_version", "source", "size_bytes")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    HYPERNET_VERSION_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    hypernet_version: str
    source: str
    size_bytes: int
    def __init__(self, adapter_id: _Optional[str] = ..., hypernet_version: _Optional[str] = ..., source: _Optional[str] = ..., size_bytes: _Optional[int] = ...) -> None: ...

class ListAdaptersResponse(_message.Message):
    __slots__ = ("adapters", "next_page_token")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterSummary]
    next_page_token: str
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterSummary, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Hypernetwork(_message.Message):
    __slots__ = ("kind", "hypernet_version", "rank", "alpha", "target_modules")
    KIND_FIELD_NUMBER: _ClassVar[int]
    HYPERNET_VERSION_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    TARGET_MODULES_FIELD_NUMBER: _ClassVar[int]
    kind: str
    hypernet_version: str
    rank: int
    alpha: float
    target_modules: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, kind: _Optional[str] = ..., hypernet_version: _Optional[str] = ..., rank: _Optional[int] = ..., alpha: _Optional[float] = ..., target_modules: _Optional[_Iterable[str]] = ...) -> None: ...

class DescribeResponse(_message.Message):
    __slots__ = ("base_fingerprint", "base_name", "hypernetworks")
    BASE_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    BASE_NAME_FIELD_NUMBER: _ClassVar[int]
    HYPERNETWORKS_FIELD_NUMBER: _ClassVar[int]
    base_fingerprint: str
    base_name: str
    hypernetworks: _containers.RepeatedCompositeFieldContainer[Hypernetwork]
    def __init__(self, base_fingerprint: _Optional[str] = ..., base_name: _Optional[str] = ..., hypernetworks: _Optional[_Iterable[_Union[Hypernetwork, _Mapping]]] = ...) -> None: ...

class AdapterRef(_message.Message):
    __slots__ = ("task", "document", "adapter_id", "budget_seconds")
    TASK_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    BUDGET_SECONDS_FIELD_NUMBER: _ClassVar[int]
    task: str
    document: bytes
    adapter_id: str
    budget_seconds: float
    def __init__(self, task: _Optional[str] = ..., document: _Optional[bytes] = ..., adapter_id: _Optional[str] = ..., budget_seconds: _Optional[float] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("adapter", "prompt", "max_new_tokens", "mode")
    ADAPTER_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MODE_FIELD_NUMBER: _ClassVar[int]
    adapter: AdapterRef
    prompt: str
    max_new_tokens: int
    mode: ApplyMode
    def __init__(self, adapter: _Optional[_Union[AdapterRef, _Mapping]] = ..., prompt: _Optional[str] = ..., max_new_tokens: _Optional[int] = ..., mode: _Optional[_Union[ApplyMode, str]] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("adapter_fetch_seconds", "apply_seconds", "first_token_seconds", "total_seconds")
    ADAPTER_FETCH_SECONDS_FIELD_NUMBER: _ClassVar[int]
    APPLY_SECONDS_FIELD_NUMBER: _ClassVar[int]
    FIRST_TOKEN_SECONDS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SECONDS_FIELD_NUMBER: _ClassVar[int]
    adapter_fetch_seconds: float
    apply_seconds: float
    first_token_seconds: float
    total_seconds: float
    def __init__(self, adapter_fetch_seconds: _Optional[float] = ..., apply_seconds: _Optional[float] = ..., first_token_seconds: _Optional[float] = ..., total_seconds: _Optional[float] = ...) -> None: ...

class GenerateEvent(_message.Message):
    __slots__ = ("started", "token", "done", "progress")
    class Started(_message.Message):
        __slots__ = ("adapter_id", "resident")
        ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
        RESIDENT_FIELD_NUMBER: _ClassVar[int]
        adapter_id: str
        resident: bool
        def __init__(self, adapter_id: _Optional[str] = ..., resident: _Optional[bool] = ...) -> None: ...
    class Token(_message.Message):
        __slots__ = ("text",)
        TEXT_FIELD_NUMBER: _ClassVar[int]
        text: str
        def __init__(self, text: _Optional[str] = ...) -> None: ...
    class Done(_message.Message):
        __slots__ = ("tokens", "timings")
        TOKENS_FIELD_NUMBER: _ClassVar[int]
        TIMINGS_FIELD_NUMBER: _ClassVar[int]
        tokens: int
        timings: Timings
        def __init__(self, tokens: _Optional[int] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ...) -> None: ...
    STARTED_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    started: GenerateEvent.Started
    token: GenerateEvent.Token
    done: GenerateEvent.Done
    progress: InternalizeProgress
    def __init__(self, started: _Optional[_Union[GenerateEvent.Started, _Mapping]] = ..., token: _Optional[_Union[GenerateEvent.Token, _Mapping]] = ..., done: _Optional[_Union[GenerateEvent.Done, _Mapping]] = ..., progress: _Optional[_Union[InternalizeProgress, _Mapping]] = ...) -> None: ...

class ResidentAdapter(_message.Message):
    __slots__ = ("adapter_id", "size_bytes", "hypernet_version")
    ADAPTER_ID_FIELD_NUMBER: _ClassVar[int]
    SIZE_BYTES_FIELD_NUMBER: _ClassVar[int]
    HYPERNET_VERSION_FIELD_NUMBER: _ClassVar[int]
    adapter_id: str
    size_bytes: int
    hypernet_version: str
    def __init__(self, adapter_id: _Optional[str] = ..., size_bytes: _Optional[int] = ..., hypernet_version: _Optional[str] = ...) -> None: ...

class ListResidentRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListResidentResponse(_message.Message):
    __slots__ = ("adapters", "capacity_bytes", "used_bytes")
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[ResidentAdapter]
    capacity_bytes: int
    used_bytes: int
    def __init__(self, adapters: _Optional[_Iterable[_Union[ResidentAdapter, _Mapping]]] = ..., capacity_bytes: _Optional[int] = ..., used_bytes: _Optional[int] = ...) -> None: ...

class PrefetchRequest(_message.Message):
    __slots__ = ("adapters",)
    ADAPTERS_FIELD_NUMBER: _ClassVar[int]
    adapters: _containers.RepeatedCompositeFieldContainer[AdapterRef]
    def __init__(self, adapters: _Optional[_Iterable[_Union[AdapterRef, _Mapping]]] = ...) -> None: ...

class PrefetchResponse(_message.Message):
    __slots__ = ("adapter_ids",)
    ADAPTER_IDS_FIELD_NUMBER: _ClassVar[int]
    adapter_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, adapter_ids: _Optional[_Iterable[str]] = ...) -> None: ...
