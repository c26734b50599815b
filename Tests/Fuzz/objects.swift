// libFuzzer target: DocumentLoader as the CLI uses it (JSON or YAML by the first bytes), then the
// object decoder on what it read.
import KubeObjects

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzObjects(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    if let objects = try? DocumentLoader.load(bytes, source: "fuzz.json") {
        _ = objects.declaresNoServices
    }
    return 0
}
