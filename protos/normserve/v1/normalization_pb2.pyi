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
    FLOAT32: _ClassVar[DType]
    FLOAT64: _ClassVar[DType]
    FLOAT16: _ClassVar[DType]
    BFLOAT16: _ClassVar[DType]

class Kind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KIND_UNSPECIFIED: _ClassVar[Kind]
    BATCH_NORM: _ClassVar[Kind]
    LAYER_NORM: _ClassVar[Kind]
    INSTANCE_NORM: _ClassVar[Kind]
    GROUP_NORM: _ClassVar[Kind]
    RMS_NORM: _ClassVar[Kind]
    LAYER_NORM_2D: _ClassVar[Kind]
DTYPE_UNSPECIFIED: DType
FLOAT32: DType
FLOAT64: DType
FLOAT16: DType
BFLOAT16: DType
KIND_UNSPECIFIED: Kind
BATCH_NORM: Kind
LAYER_NORM: Kind
INSTANCE_NORM: Kind
GROUP_NORM: Kind
RMS_NORM: Kind
LAYER_NORM_2D: Kind

class Tensor(_message.Message):
    __slots__ = ("dtype", "shape", "data", "shared_memory")
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    dtype: DType
    shape: _containers.RepeatedScalarFieldContainer[int]
    data: bytes
    shared_memory: SharedMemoryRef
    def __init__(self, dtype: _Optional[_Union[DType, str]] = ..., shape: _Optional[_Iterable[int]] = ..., data: _Optional[bytes] = ..., shared_memory: _Optional[_Union[SharedMemoryRef, _Mapping]] = ...) -> None: ...

class SharedMemoryRef(_message.Message):
    __slots__ = ("region", "offset", "byte_size")
    REGION_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    region: str
    offset: int
    byte_size: int
    def __init__(self, region: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ...) -> None: ...

class LayerConfig(_message.Message):
    __slots__ = ("kind", "num_features", "normalized_shape", "num_groups", "eps", "momentum", "cumulative_average", "affine", "track_running_stats", "bias", "biased_running_var", "device", "param_dtype")
    KIND_FIELD_NUMBER: _ClassVar[int]
    NUM_FEATURES_FIELD_NUMBER: _ClassVar[int]
    NORMALIZED_SHAPE_FIELD_NUMBER: _ClassVar[int]
    NUM_GROUPS_FIELD_NUMBER: _ClassVar[int]
    EPS_FIELD_NUMBER: _ClassVar[int]
    MOMENTUM_FIELD_NUMBER: _ClassVar[int]
    CUMULATIVE_AVERAGE_FIELD_NUMBER: _ClassVar[int]
    AFFINE_FIELD_NUMBER: _ClassVar[int]
    TRACK_RUNNING_STATS_FIELD_NUMBER: _ClassVar[int]
    BIAS_FIELD_NUMBER: _ClassVar[int]
    BIASED_RUNNING_VAR_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PARAM_DTYPE_FIELD_NUMBER: _ClassVar[int]
    kind: Kind
    num_features: int
    normalized_shape: _containers.RepeatedScalarFieldContainer[int]
    num_groups: int
    eps: float
    momentum: float
    cumulative_average: bool
    affine: bool
    track_running_stats: bool
    bias: bool
    biased_running_var: bool
    device: str
    param_dtype: DType
    def __init__(self, kind: _Optional[_Union[Kind, str]] = ..., num_features: _Optional[int] = ..., normalized_shape: _Optional[_Iterable[int]] = ..., num_groups: _Optional[int] = ..., eps: _Optional[float] = ..., momentum: _Optional[float] = ..., cumulative_average: _Optional[bool] = ..., affine: _Optional[bool] = ..., track_running_stats: _Optional[bool] = ..., bias: _Optional[bool] = ..., biased_running_var: _Optional[bool] = ..., device: _Optional[str] = ..., param_dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class Layer(_message.Message):
    __slots__ = ("name", "config", "version", "num_batches_tracked", "param_shape", "state_keys", "stats", "restore_error", "oldest_version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCHES_TRACKED_FIELD_NUMBER: _ClassVar[int]
    PARAM_SHAPE_FIELD_NUMBER: _ClassVar[int]
    STATE_KEYS_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    RESTORE_ERROR_FIELD_NUMBER: _ClassVar[int]
    OLDEST_VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    config: LayerConfig
    version: int
    num_batches_tracked: int
    param_shape: _containers.RepeatedScalarFieldContainer[int]
    state_keys: _containers.RepeatedScalarFieldContainer[str]
    stats: LayerStats
    restore_error: str
    oldest_version: int
    def __init__(self, name: _Optional[str] = ..., config: _Optional[_Union[LayerConfig, _Mapping]] = ..., version: _Optional[int] = ..., num_batches_tracked: _Optional[int] = ..., param_shape: _Optional[_Iterable[int]] = ..., state_keys: _Optional[_Iterable[str]] = ..., stats: _Optional[_Union[LayerStats, _Mapping]] = ..., restore_error: _Optional[str] = ..., oldest_version: _Optional[int] = ...) -> None: ...

class LayerStats(_message.Message):
    __slots__ = ("train_calls", "mean_shift", "log_var_shift", "input_entropy", "output_entropy")
    TRAIN_CALLS_FIELD_NUMBER: _ClassVar[int]
    MEAN_SHIFT_FIELD_NUMBER: _ClassVar[int]
    LOG_VAR_SHIFT_FIELD_NUMBER: _ClassVar[int]
    INPUT_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_ENTROPY_FIELD_NUMBER: _ClassVar[int]
    train_calls: int
    mean_shift: float
    log_var_shift: float
    input_entropy: float
    output_entropy: float
    def __init__(self, train_calls: _Optional[int] = ..., mean_shift: _Optional[float] = ..., log_var_shift: _Optional[float] = ..., input_entropy: _Optional[float] = ..., output_entropy: _Optional[float] = ...) -> None: ...

class CreateLayerRequest(_message.Message):
    __slots__ = ("name", "config")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    name: str
    config: LayerConfig
    def __init__(self, name: _Optional[str] = ..., config: _Optional[_Union[LayerConfig, _Mapping]] = ...) -> None: ...

class GetLayerRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class ListLayersRequest(_message.Message):
    __slots__ = ("prefix", "page_size", "page_token")
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    page_size: int
    page_token: str
    def __init__(self, prefix: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListLayersResponse(_message.Message):
    __slots__ = ("layers", "next_page_token")
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    next_page_token: str
    def __init__(self, layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class DeleteLayerRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class DeleteLayerResponse(_message.Message):
    __slots__ = ("layer",)
    LAYER_FIELD_NUMBER: _ClassVar[int]
    layer: Layer
    def __init__(self, layer: _Optional[_Union[Layer, _Mapping]] = ...) -> None: ...

class SyncGroup(_message.Message):
    __slots__ = ("id", "world_size", "rank", "step")
    ID_FIELD_NUMBER: _ClassVar[int]
    WORLD_SIZE_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    id: str
    world_size: int
    rank: int
    step: int
    def __init__(self, id: _Optional[str] = ..., world_size: _Optional[int] = ..., rank: _Optional[int] = ..., step: _Optional[int] = ...) -> None: ...

class TrainRequest(_message.Message):
    __slots__ = ("layer", "x", "output_dtype", "keep_forward", "output_shared_memory", "parameters", "sync", "return_running_stats")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    LAYER_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    KEEP_FORWARD_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    RETURN_RUNNING_STATS_FIELD_NUMBER: _ClassVar[int]
    layer: str
    x: Tensor
    output_dtype: DType
    keep_forward: bool
    output_shared_memory: SharedMemoryRef
    parameters: _containers.MessageMap[str, Tensor]
    sync: SyncGroup
    return_running_stats: bool
    def __init__(self, layer: _Optional[str] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., output_dtype: _Optional[_Union[DType, str]] = ..., keep_forward: _Optional[bool] = ..., output_shared_memory: _Optional[_Union[SharedMemoryRef, _Mapping]] = ..., parameters: _Optional[_Mapping[str, Tensor]] = ..., sync: _Optional[_Union[SyncGroup, _Mapping]] = ..., return_running_stats: _Optional[bool] = ...) -> None: ...

class TrainResponse(_message.Message):
    __slots__ = ("y", "version", "num_batches_tracked", "forward_id", "running_stats")
    class RunningStatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    Y_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCHES_TRACKED_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ID_FIELD_NUMBER: _ClassVar[int]
    RUNNING_STATS_FIELD_NUMBER: _ClassVar[int]
    y: Tensor
    version: int
    num_batches_tracked: int
    forward_id: str
    running_stats: _containers.MessageMap[str, Tensor]
    def __init__(self, y: _Optional[_Union[Tensor, _Mapping]] = ..., version: _Optional[int] = ..., num_batches_tracked: _Optional[int] = ..., forward_id: _Optional[str] = ..., running_stats: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class InferRequest(_message.Message):
    __slots__ = ("layer", "x", "output_dtype", "output_shared_memory")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    layer: str
    x: Tensor
    output_dtype: DType
    output_shared_memory: SharedMemoryRef
    def __init__(self, layer: _Optional[str] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., output_dtype: _Optional[_Union[DType, str]] = ..., output_shared_memory: _Optional[_Union[SharedMemoryRef, _Mapping]] = ...) -> None: ...

class InferResponse(_message.Message):
    __slots__ = ("y", "version")
    Y_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    y: Tensor
    version: int
    def __init__(self, y: _Optional[_Union[Tensor, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class GradientRequest(_message.Message):
    __slots__ = ("layer", "x", "forward_id", "dy", "training", "output_dtype", "output_shared_memory", "sync")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    X_FIELD_NUMBER: _ClassVar[int]
    FORWARD_ID_FIELD_NUMBER: _ClassVar[int]
    DY_FIELD_NUMBER: _ClassVar[int]
    TRAINING_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SHARED_MEMORY_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    layer: str
    x: Tensor
    forward_id: str
    dy: Tensor
    training: bool
    output_dtype: DType
    output_shared_memory: SharedMemoryRef
    sync: SyncGroup
    def __init__(self, layer: _Optional[str] = ..., x: _Optional[_Union[Tensor, _Mapping]] = ..., forward_id: _Optional[str] = ..., dy: _Optional[_Union[Tensor, _Mapping]] = ..., training: _Optional[bool] = ..., output_dtype: _Optional[_Union[DType, str]] = ..., output_shared_memory: _Optional[_Union[SharedMemoryRef, _Mapping]] = ..., sync: _Optional[_Union[SyncGroup, _Mapping]] = ...) -> None: ...

class GradientResponse(_message.Message):
    __slots__ = ("dx", "dweight", "dbias", "version")
    DX_FIELD_NUMBER: _ClassVar[int]
    DWEIGHT_FIELD_NUMBER: _ClassVar[int]
    DBIAS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    dx: Tensor
    dweight: Tensor
    dbias: Tensor
    version: int
    def __init__(self, dx: _Optional[_Union[Tensor, _Mapping]] = ..., dweight: _Optional[_Union[Tensor, _Mapping]] = ..., dbias: _Optional[_Union[Tensor, _Mapping]] = ..., version: _Optional[int] = ...) -> None: ...

class GetStateRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class LayerState(_message.Message):
    __slots__ = ("name", "version", "tensors", "num_batches_tracked")
    class TensorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCHES_TRACKED_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    tensors: _containers.MessageMap[str, Tensor]
    num_batches_tracked: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ..., tensors: _Optional[_Mapping[str, Tensor]] = ..., num_batches_tracked: _Optional[int] = ...) -> None: ...

class SetStateRequest(_message.Message):
    __slots__ = ("name", "tensors", "num_batches_tracked", "expected_version", "partial")
    class TensorsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    NAME_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCHES_TRACKED_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    PARTIAL_FIELD_NUMBER: _ClassVar[int]
    name: str
    tensors: _containers.MessageMap[str, Tensor]
    num_batches_tracked: int
    expected_version: int
    partial: bool
    def __init__(self, name: _Optional[str] = ..., tensors: _Optional[_Mapping[str, Tensor]] = ..., num_batches_tracked: _Optional[int] = ..., expected_version: _Optional[int] = ..., partial: _Optional[bool] = ...) -> None: ...

class RollbackRequest(_message.Message):
    __slots__ = ("name", "version")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: int
    def __init__(self, name: _Optional[str] = ..., version: _Optional[int] = ...) -> None: ...

class TensorChunk(_message.Message):
    __slots__ = ("data",)
    DATA_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    def __init__(self, data: _Optional[bytes] = ...) -> None: ...

class TrainStreamRequest(_message.Message):
    __slots__ = ("head", "chunk")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    head: TrainRequest
    chunk: TensorChunk
    def __init__(self, head: _Optional[_Union[TrainRequest, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class TrainStreamResponse(_message.Message):
    __slots__ = ("head", "chunk")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    head: TrainResponse
    chunk: TensorChunk
    def __init__(self, head: _Optional[_Union[TrainResponse, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class InferStreamRequest(_message.Message):
    __slots__ = ("head", "chunk")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    head: InferRequest
    chunk: TensorChunk
    def __init__(self, head: _Optional[_Union[InferRequest, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class InferStreamResponse(_message.Message):
    __slots__ = ("head", "chunk")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    head: InferResponse
    chunk: TensorChunk
    def __init__(self, head: _Optional[_Union[InferResponse, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class GradientStreamRequest(_message.Message):
    __slots__ = ("head", "chunk")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    head: GradientRequest
    chunk: TensorChunk
    def __init__(self, head: _Optional[_Union[GradientRequest, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class GradientStreamResponse(_message.Message):
    __slots__ = ("head", "chunk")
    HEAD_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    head: GradientResponse
    chunk: TensorChunk
    def __init__(self, head: _Optional[_Union[GradientResponse, _Mapping]] = ..., chunk: _Optional[_Union[TensorChunk, _Mapping]] = ...) -> None: ...

class RegisterSharedMemoryRequest(_message.Message):
    __slots__ = ("name", "key", "offset", "byte_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    key: str
    offset: int
    byte_size: int
    def __init__(self, name: _Optional[str] = ..., key: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ...) -> None: ...

class SharedMemoryRegion(_message.Message):
    __slots__ = ("name", "key", "offset", "byte_size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    BYTE_SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    key: str
    offset: int
    byte_size: int
    def __init__(self, name: _Optional[str] = ..., key: _Optional[str] = ..., offset: _Optional[int] = ..., byte_size: _Optional[int] = ...) -> None: ...

class UnregisterSharedMemoryRequest(_message.Message):
    __slots__ = ("name",)
    NAME_FIELD_NUMBER: _ClassVar[int]
    name: str
    def __init__(self, name: _Optional[str] = ...) -> None: ...

class UnregisterSharedMemoryResponse(_message.Message):
    __slots__ = ("regions",)
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    regions: _containers.RepeatedCompositeFieldContainer[SharedMemoryRegion]
    def __init__(self, regions: _Optional[_Iterable[_Union[SharedMemoryRegion, _Mapping]]] = ...) -> None: ...

class ListSharedMemoryRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListSharedMemoryResponse(_message.Message):
    __slots__ = ("regions",)
    REGIONS_FIELD_NUMBER: _ClassVar[int]
    regions: _containers.RepeatedCompositeFieldContainer[SharedMemoryRegion]
    def __init__(self, regions: _Optional[_Iterable[_Union[SharedMemoryRegion, _Mapping]]] = ...) -> None: ...

class BatchStatistics(_message.Message):
    __slots__ = ("count", "mean", "m2")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    M2_FIELD_NUMBER: _ClassVar[int]
    count: int
    mean: _containers.RepeatedScalarFieldContainer[float]
    m2: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, count: _Optional[int] = ..., mean: _Optional[_Iterable[float]] = ..., m2: _Optional[_Iterable[float]] = ...) -> None: ...

class TrainStatisticsRequest(_message.Message):
    __slots__ = ("layer", "statistics", "parameters", "sync")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    LAYER_FIELD_NUMBER: _ClassVar[int]
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    layer: str
    statistics: BatchStatistics
    parameters: _containers.MessageMap[str, Tensor]
    sync: SyncGroup
    def __init__(self, layer: _Optional[str] = ..., statistics: _Optional[_Union[BatchStatistics, _Mapping]] = ..., parameters: _Optional[_Mapping[str, Tensor]] = ..., sync: _Optional[_Union[SyncGroup, _Mapping]] = ...) -> None: ...

class TrainStatisticsResponse(_message.Message):
    __slots__ = ("statistics", "version", "num_batches_tracked", "running_stats")
    class RunningStatsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    STATISTICS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCHES_TRACKED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_STATS_FIELD_NUMBER: _ClassVar[int]
    statistics: BatchStatistics
    version: int
    num_batches_tracked: int
    running_stats: _containers.MessageMap[str, Tensor]
    def __init__(self, statistics: _Optional[_Union[BatchStatistics, _Mapping]] = ..., version: _Optional[int] = ..., num_batches_tracked: _Optional[int] = ..., running_stats: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class GradientStatisticsRequest(_message.Message):
    __slots__ = ("layer", "count", "sum_dy", "sum_dy_xmu", "sync")
    LAYER_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SUM_DY_FIELD_NUMBER: _ClassVar[int]
    SUM_DY_XMU_FIELD_NUMBER: _ClassVar[int]
    SYNC_FIELD_NUMBER: _ClassVar[int]
    layer: str
    count: int
    sum_dy: _containers.RepeatedScalarFieldContainer[float]
    sum_dy_xmu: _containers.RepeatedScalarFieldContainer[float]
    sync: SyncGroup
    def __init__(self, layer: _Optional[str] = ..., count: _Optional[int] = ..., sum_dy: _Optional[_Iterable[float]] = ..., sum_dy_xmu: _Optional[_Iterable[float]] = ..., sync: _Optional[_Union[SyncGroup, _Mapping]] = ...) -> None: ...

class GradientStatisticsResponse(_message.Message):
    __slots__ = ("count", "sum_dy", "sum_dy_xmu")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    SUM_DY_FIELD_NUMBER: _ClassVar[int]
    SUM_DY_XMU_FIELD_NUMBER: _ClassVar[int]
    count: int
    sum_dy: _containers.RepeatedScalarFieldContainer[float]
    sum_dy_xmu: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, count: _Optional[int] = ..., sum_dy: _Optional[_Iterable[float]] = ..., sum_dy_xmu: _Optional[_Iterable[float]] = ...) -> None: ...

class StatisticsUpdate(_message.Message):
    __slots__ = ("layer", "step", "count", "mean", "m2", "parameters")
    class ParametersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: Tensor
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...
    LAYER_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    M2_FIELD_NUMBER: _ClassVar[int]
    PARAMETERS_FIELD_NUMBER: _ClassVar[int]
    layer: str
    step: int
    count: int
    mean: Tensor
    m2: Tensor
    parameters: _containers.MessageMap[str, Tensor]
    def __init__(self, layer: _Optional[str] = ..., step: _Optional[int] = ..., count: _Optional[int] = ..., mean: _Optional[_Union[Tensor, _Mapping]] = ..., m2: _Optional[_Union[Tensor, _Mapping]] = ..., parameters: _Optional[_Mapping[str, Tensor]] = ...) -> None: ...

class PushStatisticsRequest(_message.Message):
    __slots__ = ("sequence", "updates")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    UPDATES_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    updates: _containers.RepeatedCompositeFieldContainer[StatisticsUpdate]
    def __init__(self, sequence: _Optional[int] = ..., updates: _Optional[_Iterable[_Union[StatisticsUpdate, _Mapping]]] = ...) -> None: ...

class StatisticsOutcome(_message.Message):
    __slots__ = ("code", "message", "reason", "version", "num_batches_tracked", "running_mean", "running_var")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NUM_BATCHES_TRACKED_FIELD_NUMBER: _ClassVar[int]
    RUNNING_MEAN_FIELD_NUMBER: _ClassVar[int]
    RUNNING_VAR_FIELD_NUMBER: _ClassVar[int]
    code: int
    message: str
    reason: str
    version: int
    num_batches_tracked: int
    running_mean: Tensor
    running_var: Tensor
    def __init__(self, code: _Optional[int] = ..., message: _Optional[str] = ..., reason: _Optional[str] = ..., version: _Optional[int] = ..., num_batches_tracked: _Optional[int] = ..., running_mean: _Optional[_Union[Tensor, _Mapping]] = ..., running_var: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class PushStatisticsResponse(_message.Message):
    __slots__ = ("sequence", "outcomes")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    OUTCOMES_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    outcomes: _containers.RepeatedCompositeFieldContainer[StatisticsOutcome]
    def __init__(self, sequence: _Optional[int] = ..., outcomes: _Optional[_Iterable[_Union[StatisticsOutcome, _Mapping]]] = ...) -> None: ...
