// libFuzzer target: label selector parsing and matching.
import KubeObjects

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzSelector(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let text = String(decoding: UnsafeBufferPointer(start: data, count: size), as: UTF8.self)
    if let selector = try? LabelSelector(text) {
        _ = selector.matches(["app": "web", "tier": "front", "k8s-app": "kube-dns"])
        _ = selector.matches([:])
        _ = selector.description
    }
    return 0
}
