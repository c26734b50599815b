// libFuzzer target: the JSON parser, with and without the streaming `items` sink.
import KubeObjects

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzJSON(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    _ = try? JSONParser.parse(bytes)
    var seen = 0
    _ = try? JSONParser.parse(bytes, from: 0) { _ in
        seen += 1
        return seen % 2 == 0 ? .consumed : .keep
    }
    return 0
}
