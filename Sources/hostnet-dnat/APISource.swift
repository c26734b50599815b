import KubeObjects
import KubernetesAPI

/// Services and EndpointSlices from the Kubernetes API (in-cluster, or kubeconfig).
enum APISource {
    static func load(_ source: SourceOptions, namespaces: [String], selector: String?) async throws(CLIError) -> ClusterObjects {
        let options = KubernetesSourceOptions(kubeconfig: source.kubeconfig, context: source.context,
                                              namespaces: namespaces, labelSelector: selector)
        do {
            for w in try KubernetesSource.warnings(options) { Console.warning(w) }
            return try await KubernetesSource.load(options)
        } catch {
            throw CLIError(code: error.exitCode, error.description)
        }
    }
}
