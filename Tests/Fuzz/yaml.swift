// libFuzzer target: the YAML path of the loader (budget check, Yams, conversion, object decoding).
// A document-start marker first keeps every input on the YAML path, whatever its first character.
import KubeObjects

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzYAML(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let bytes = Array("---\n".utf8) + Array(UnsafeBufferPointer(start: data, count: size))
    _ = try? DocumentLoader.load(bytes, source: "fuzz.yaml")
    return 0
}
