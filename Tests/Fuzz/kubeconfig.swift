// libFuzzer target: kubeconfig loading (YAML budget, Yams, merging, the context's cluster and user).
// Built with KubernetesAPI's Kubeconfig.swift and the files it needs compiled into this module (see
// scripts/fuzz), because the module's HTTP dependencies are not needed for this.
import KubeObjects

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzzKubeconfig(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    let bytes = Array(UnsafeBufferPointer(start: data, count: size))
    var config = Kubeconfig()
    do throws(KubernetesAPIError) {
        try config.merge(data: bytes, file: "/nonexistent/fuzz/config")
        _ = try config.connection(context: nil)
    } catch {
        _ = error.description
    }
    return 0
}
